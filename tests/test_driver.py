"""runtime/driver.py with issue 17's settings: n samples per row through a killed and resumed
run (exactly once per (id, sample_index)), the optional columns, a scoring-only job."""
from __future__ import annotations

import glob
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _job import job_args, run_inprocess, write_prompts
from _procs import wait_for_parts
from conftest import ROOT

pytestmark = pytest.mark.slow   # jobs run in-process and in a killed subprocess

ROWS = 6
SAMPLED = ("generation.n=4", "generation.temperature=0.9", "generation.logprobs=2",
           "generation.max_new_tokens=4", "data.shard_rows=4", "engine.max_num_seqs=8")


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("in") / "prompts.parquet", ROWS)


def _rows(out: Path) -> list[dict]:
    return [r for f in sorted(glob.glob(str(out / "part-*.parquet")))
            for r in pq.read_table(f).to_pylist()]


def test_n_samples_resume_exactly_once_per_pair(ckpt, data, tmp_path):
    ref_out = tmp_path / "ref"
    run_inprocess(job_args(ckpt, data, ref_out, *SAMPLED))
    ref = {(r["id"], r["sample_index"]): r for r in _rows(ref_out)}
    assert sorted(ref) == [(i, s) for i in range(ROWS) for s in range(4)]
    schema = pq.read_schema(glob.glob(str(ref_out / "part-*.parquet"))[0])
    assert schema.names[-3:] == ["sample_index", "token_logprobs", "top_logprobs"]
    assert schema.field("sample_index").type == pa.int32()
    for r in ref.values():
        assert len(r["token_logprobs"]) == len(r["top_logprobs"]) == r["completion_tokens"]
        assert all(len(p) == 2 and p[0]["logprob"] >= p[1]["logprob"] for p in r["top_logprobs"])

    out = tmp_path / "out"
    code = ("import sys; sys.path.insert(0, 'tests'); from _job import run_inprocess; "
            f"run_inprocess({job_args(ckpt, data, out, *SAMPLED)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    wait_for_parts(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = Counter((r["id"], r["sample_index"]) for r in _rows(out))
    assert 0 < len(before) < 4 * ROWS and max(before.values()) == 1, "kill mid-run"
    run_inprocess(job_args(ckpt, data, out, *SAMPLED))
    got = _rows(out)
    pairs = Counter((r["id"], r["sample_index"]) for r in got)
    assert set(pairs) == set(ref) and max(pairs.values()) == 1      # each pair exactly once
    for r in got:
        assert r["completion_token_ids"] == ref[(r["id"], r["sample_index"])]["completion_token_ids"]


def test_scoring_job_and_unchanged_default_schema(ckpt, data, tmp_path):
    run_inprocess(job_args(ckpt, data, tmp_path / "score", "generation.max_new_tokens=0",
                           "generation.prompt_logprobs=true"))
    rows = _rows(tmp_path / "score")
    assert len(rows) == ROWS
    for r in rows:
        assert r["completion"] == "" and r["finish_reason"] == "length"
        p = r["prompt_token_logprobs"]
        assert len(p) == r["prompt_tokens"] and p[0] is None and all(v < 0 for v in p[1:])
    assert "sample_index" not in rows[0] and "token_logprobs" not in rows[0]
    # the same directory with another generation setting is another job
    from internlm2_tp.errors import OutputDirError
    with pytest.raises(OutputDirError, match="output_columns"):
        run_inprocess(job_args(ckpt, data, tmp_path / "score", "generation.max_new_tokens=0"))
