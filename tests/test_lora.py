"""model.lora: a PEFT adapter (written by peft itself where installed) merged at load, against
the same weights merged independently in plain torch (tests/_lora.py), at tp 1, 2 and 4 and in
both layouts; and each refusal, naming the field or tensor."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _job import job_args, run_job
from _lora import merged_copy, write_adapter
from internlm2_tp.checkpoint import CheckpointReader
from internlm2_tp.errors import CheckpointError, OutputDirError
from internlm2_tp.lora import LoraAdapter, MergingReader

INTERNLM2 = ["wqkv", "wo", "w1", "w2", "w3"]
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[1, 300, 301, 302], [1, 20, 21, 22, 23, 24, 25], [1, 7000, 7001]]


@pytest.fixture(scope="module")
def base(make_ckpt):
    return make_ckpt(dtype="float32", num_shards=3)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return write_adapter(tmp_path_factory.mktemp("lora") / "a", base, INTERNLM2, r=4, alpha=8)


@pytest.fixture(scope="module")
def runs(make_ckpt, tmp_path_factory) -> list[tuple[str, str]]:
    """Per layout: (checkpoint, adapter), (the copy merged in plain torch, none), (checkpoint,
    none). InternLM2's layout with lora_alpha / r, the Llama layout's with rslora."""
    tmp, out = tmp_path_factory.mktemp("lora-runs"), []
    for layout, targets, rslora in (("internlm2", INTERNLM2, False), ("llama", LLAMA, True)):
        ckpt = make_ckpt(dtype="float32", layout=layout, vocab_size=8000)   # small: 6 loads a rank
        lora = write_adapter(tmp / layout, ckpt, targets, r=8, alpha=16, rslora=rslora)
        merged = merged_copy(ckpt, lora, tmp / f"{layout}-merged")
        out += [(str(ckpt), str(lora)), (str(merged), ""), (str(ckpt), "")]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merged_at_load_equals_merged_in_torch(tp, runs):
    """Both layouts on one group: InternLM2's (wqkv by KV group, w1/w3 into w13) and the Llama
    layout's (q/k/v, gate/up/down)."""
    from _mp import run_ranks
    from _ranks import rank_lora_tokens
    from internlm2_tp.engine.params import SamplingParams

    reqs = [(i, p, SamplingParams(max_new_tokens=8, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    out = run_ranks(rank_lora_tokens, tp, runs, reqs)[0]
    for k in (0, 3):                       # each layout: (with the adapter, merged, base)
        with_lora, ref, plain = out[k:k + 3]
        assert with_lora == ref
        assert with_lora != plain          # the adapter changes the tokens: the test can tell


def test_each_rank_reads_only_its_slices(base, adapter):
    """The merged block of a row slice and of a column slice is that block of the full merge."""
    import torch
    reader = CheckpointReader(base)
    merging = MergingReader(reader, LoraAdapter(adapter, "internlm2", reader))
    name = "model.layers.1.attention.wqkv.weight"
    full = merging.read(name)
    assert torch.equal(merging.read(name, rows=(64, 128)), full[64:128])
    name = "model.layers.0.feed_forward.w2.weight"
    full = merging.read(name)
    assert torch.allclose(merging.read(name, cols=(128, 256)), full[:, 128:256], atol=1e-6)
    assert not torch.equal(full, reader.read(name))
    untouched = "model.layers.0.attention_norm.weight"
    assert torch.equal(merging.read(untouched), reader.read(untouched))


def test_bin_adapter_reads_as_safetensors(base, adapter, tmp_path):
    """adapter_model.bin (older peft, XTuner) merges the same as adapter_model.safetensors."""
    import torch
    from safetensors.torch import load_file

    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(adapter / "adapter_config.json", binary)
    torch.save(load_file(str(adapter / "adapter_model.safetensors")),
               binary / "adapter_model.bin")
    reader = CheckpointReader(base)
    name = "model.layers.0.attention.wqkv.weight"
    got = [MergingReader(reader, LoraAdapter(d, "internlm2", reader)).read(name, rows=(0, 96))
           for d in (adapter, binary)]
    assert torch.equal(got[0], got[1])


def _variant(adapter: Path, tmp: Path, config: dict | None = None,
             tensors: dict | None = None) -> Path:
    out = tmp / "variant"
    shutil.copytree(adapter, out)
    if config is not None:
        raw = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    if tensors is not None:
        from safetensors.torch import load_file, save_file
        sd = load_file(str(out / "adapter_model.safetensors"))
        sd.update(tensors)
        save_file({k: v for k, v in sd.items() if v is not None},
                  str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("config, expect", [
    ({"peft_type": "PREFIX_TUNING"}, "peft_type must be LORA"),
    ({"use_dora": True}, "use_dora=True is refused: DoRA"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True is refused"),
    ({"bias": "lora_only"}, "bias='lora_only' is refused"),
    ({"target_modules": ["wqkv", "q_proj"]}, "target_modules ['q_proj'] are not linear layers"),
    ({"modules_to_save": ["output"]}, "modules_to_save"),
    ({"r": 0}, "r must be a positive integer"),
])
def test_config_refusals_name_the_field(config, expect, base, adapter, tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        LoraAdapter(_variant(adapter, tmp_path, config=config), "internlm2",
                    CheckpointReader(base))


def test_tensor_refusals_name_the_tensor(base, adapter, tmp_path):
    import torch
    a = "base_model.model.model.layers.0.attention.wo.lora_A.weight"
    cases = [({a: torch.zeros(4, 7)}, f"tensor {a} has shape [4, 7]"),
             ({a: None}, "attention.wo.weight has lora_B without lora_A"),
             ({"base_model.model.model.tok_embeddings.lora_embedding_A": torch.zeros(4, 3)},
              "is not a LoRA A/B matrix"),
             ({"base_model.model.model.norm.lora_A.weight": torch.zeros(4, 192),
               "base_model.model.model.norm.lora_B.weight": torch.zeros(192, 4)},
              "adapts model.norm.weight, which is not a linear layer")]
    for i, (tensors, expect) in enumerate(cases):
        with pytest.raises(CheckpointError, match=re.escape(expect)):
            LoraAdapter(_variant(adapter, tmp_path / str(i), tensors=tensors), "internlm2",
                        CheckpointReader(base))


def test_job_refuses_a_bad_adapter_and_fingerprints_a_good_one(base, adapter, tmp_path,
                                                                capsys):
    from internlm2_tp.job_config import load_job_config
    from internlm2_tp.runtime.driver import Job
    from conftest import ROOT

    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [0], "prompt": ["hello"]}), data)
    bad = _variant(adapter, tmp_path, config={"use_dora": True})
    rc, err = run_job(job_args(base, data, tmp_path / "o1", f"model.lora={bad}"), capsys)
    assert rc == 2 and "use_dora=True is refused" in err, err
    out = tmp_path / "o2"
    conf = ROOT / "conf" / "batch_infer.yaml"
    Job(load_job_config(conf, job_args(base, data, out, f"model.lora={adapter}")))
    fp = json.loads((out / "_job.json").read_text())["fingerprint"]["model"]["lora"]
    assert fp["path"] == str(adapter.resolve()) and len(fp["sha256"]) == 64
    other = write_adapter(tmp_path / "other", base, ["wo"], seed=1)
    with pytest.raises(OutputDirError, match="model.lora.path.*model.lora.sha256"):
        Job(load_job_config(conf, job_args(base, data, out, f"model.lora={other}")))
