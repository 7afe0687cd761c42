"""Issue 7, hostile inputs: a checkpoint is data, never code (no pickle runs, no module of its
directory is imported), and row ids never reach a file path."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from _ckpt import INDEX, clone, edit_json
from _job import job_args, read_out, run_job, write_prompts


@pytest.fixture(scope="module")
def ckpt(make_ckpt) -> Path:
    return make_ckpt(dtype="float32")


class Payload:
    """Unpickling this runs a shell command: what a hostile pytorch_model.bin would carry."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.slow   # the payload proven in a process of its own
@pytest.mark.parametrize("layout", ["zip", "legacy", "indexed"])
def test_malicious_bin_never_runs(layout, ckpt, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    d = clone(ckpt, tmp_path / "evil")
    for f in d.glob("model*"):   # the safetensors shards and their index
        f.unlink()
    name = "pytorch_model-00001-of-00001.bin" if layout == "indexed" else "pytorch_model.bin"
    evil = {"model.tok_embeddings.weight": Payload(f"touch {marker}")}
    torch.save(evil, d / name, _use_new_zipfile_serialization=layout != "legacy")
    if layout == "indexed":  # every tensor in the hostile file
        names = json.loads((ckpt / INDEX).read_text())["weight_map"]
        (d / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"weight_map": {t: name for t in names}}))
    # The payload is real: a plain torch.load (weights_only=False) runs it.
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(d / name)!r}, "
                    "weights_only=False)"], capture_output=True, timeout=120)
    assert marker.exists(), "the test's payload did not work"
    marker.unlink()
    data = write_prompts(tmp_path / "p.parquet", 3)
    rc, err = run_job(job_args(d, data, tmp_path / "out"), capsys)
    assert rc == 2 and f"{d / name}: refused or unreadable .bin" in err, err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


TROJAN = "import pathlib; pathlib.Path({marker!r}).write_text(__name__)\n"


def test_checkpoint_code_is_never_imported(ckpt, tmp_path, capsys):
    """A published InternLM2 checkpoint ships modeling/configuration/tokenization code named by
    auto_map; Transformers would import it (trust_remote_code). We read config.json as data."""
    marker = tmp_path / "IMPORTED"
    d = clone(ckpt, tmp_path / "trojan", copy=("tokenizer_config.json",))
    for mod in ("modeling_internlm2", "configuration_internlm2", "tokenization_internlm2",
                "tokenization_internlm2_fast", "__init__"):
        (d / f"{mod}.py").write_text(TROJAN.format(marker=str(marker)))
    auto = {"AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                              "tokenization_internlm2_fast.InternLM2TokenizerFast"]}
    edit_json(d / "config.json", lambda c: c.update(auto_map=auto))
    edit_json(d / "tokenizer_config.json", lambda c: c.update(auto_map=auto))
    data = write_prompts(tmp_path / "p.parquet", 3)
    rc, err = run_job(job_args(d, data, tmp_path / "out"), capsys)
    assert rc == 0, err
    assert sorted(read_out(tmp_path / "out")) == [0, 1, 2]
    assert not marker.exists()
    assert not [m for m in list(sys.modules.values())
                if str(d) in str(getattr(m, "__file__", "") or "")]


HOSTILE_IDS = ["../../etc/x", "/tmp/internlm2_tp_abs_id", "a/b/c", "..", ".", "~", "C:\\evil",
               "nul\x00byte", "part-evil-00000.parquet", "_manifest.json", "job.json",
               ".part-x-00000.parquet.0a1b.tmp", "%s%n", "😀/..", " "]


def test_row_ids_never_reach_file_paths(ckpt, tmp_path, capsys):
    data = tmp_path / "in" / "p.parquet"
    data.parent.mkdir()
    n = len(HOSTILE_IDS)
    pq.write_table(pa.table({"id": HOSTILE_IDS, "prompt": [f"row {i}" for i in range(n)]}), data)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    rc, err = run_job(job_args(ckpt, data, out, "data.shard_rows=4", "generation.max_new_tokens=2"),
                      capsys)
    assert rc == 0, err
    got = read_out(out)
    assert sorted(got) == sorted(HOSTILE_IDS)          # each id exactly once, byte for byte
    assert all(r["error"] is None for r in got.values())
    names = sorted(p.name for p in out.iterdir())
    parts = [x for x in names if re.fullmatch(r"part-\d{8}T\d{6}-[0-9a-f]{8}-\d{5}\.parquet", x)]
    assert names == sorted(parts + ["_job.json", "_manifest.json"]) and len(parts) == -(-n // 4)
    after = sorted(str(p) for p in tmp_path.rglob("*") if out not in p.parents and p != out)
    assert after == before                              # nothing written outside data.output
    assert not Path("/tmp/internlm2_tp_abs_id").exists()
