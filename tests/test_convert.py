"""The checkpoint converter: exact logits in transformers and in our model, bit-identical round
trips, streaming memory, and refusals."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _mp import run_ranks
from _ranks import build_model, prefill_logits, rank_logits
from internlm2_tp.config import ModelConfig
from internlm2_tp.errors import JobConfigError
from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint
from internlm2_tp.tools.convert import ConvertError, convert, parse_args

pytestmark = pytest.mark.slow   # the converter as a process, ranks as processes (gloo)

ROOT = Path(__file__).resolve().parents[1]
SPEC = dict(dtype="float32", hidden_size=192, num_attention_heads=48, num_key_value_heads=8,
            intermediate_size=256, num_hidden_layers=2, vocab_size=1000)
SEQS = [[1, 17, 523, 9, 888, 41, 2], [1, 300, 301, 302, 5, 999, 12, 64, 7, 700, 3, 4], [1, 99, 6]]


def state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read with safetensors/torch directly (not our reader)."""
    index = next(ckpt.glob("*.index.json"))
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        part = load_file(ckpt / f) if f.endswith(".safetensors") else \
            torch.load(ckpt / f, weights_only=True)
        assert not set(part) & set(sd)
        sd.update(part)
    return sd


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def src(make_ckpt) -> Path:
    return make_ckpt(**SPEC)


@pytest.fixture(scope="module")
def llama_dir(src, tmp_path_factory) -> Path:
    """Converted through the CLI as a user runs it, into several small shards."""
    out = tmp_path_factory.mktemp("cvt") / "llama"
    r = subprocess.run([sys.executable, "jobs/convert.py", "to=llama", f"input={src}",
                        f"output={out}", "shard_size_mb=0.5"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def original_logits(src) -> torch.Tensor:
    return prefill_logits(build_model(0, 1, 0, src), SEQS)


def test_llama_files(src, llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert "auto_map" not in cfg and cfg["attention_bias"] is False
    assert cfg["head_dim"] == 4 and cfg["rope_theta"] == 1e6 and cfg["hidden_act"] == "silu"
    assert cfg["torch_dtype"] == "float32" and cfg["tie_word_embeddings"] is False
    assert "auto_map" not in json.loads((llama_dir / "tokenizer_config.json").read_text())
    assert (llama_dir / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert (llama_dir / "generation_config.json").is_file()
    index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in llama_dir.glob("*.safetensors")) == files
    assert not [p for p in llama_dir.iterdir() if p.name.startswith(".tmp")]
    sd = state_dict(llama_dir)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (192, 192)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (32, 192)
    assert "lm_head.weight" in sd and "model.embed_tokens.weight" in sd


def test_transformers_llama_matches_our_model(llama_dir, original_logits):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(llama_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in SEQS])
    assert ref.shape == original_logits.shape
    diff = (ref - original_logits).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff}"


def test_dynamic_rope_scaling_carries_over(make_ckpt, tmp_path):
    """rope_scaling dynamic (NTK) means the same in transformers' Llama: past
    max_position_embeddings (8 here) the logits still agree."""
    from transformers import LlamaForCausalLM

    src = make_ckpt(**{**SPEC, "max_position_embeddings": 8,
                       "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    out = convert("llama", src, tmp_path / "l", progress=False)
    ours = prefill_logits(build_model(0, 1, 0, src), SEQS)
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in SEQS])
    diff = (ref - ours).abs().max().item()
    assert diff < 1e-4, f"max |logit diff| {diff}"


def test_our_model_reads_llama_layout(src, llama_dir, original_logits):
    assert ModelConfig.from_dir(llama_dir).layout == "llama"
    tp1 = prefill_logits(build_model(0, 1, 0, llama_dir), SEQS)
    assert (tp1 - original_logits).abs().max().item() < 1e-5
    tp2 = run_ranks(rank_logits, 2, str(llama_dir), SEQS)[0]
    diff = (tp2 - original_logits).abs().max().item()
    assert diff < 1e-4, f"tp=2 on the Llama layout: max |logit diff| {diff}"


def test_round_trip_is_bit_identical(make_ckpt, tmp_path):
    src = make_ckpt(**{**SPEC, "dtype": "bfloat16", "num_shards": 3,
                       "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    convert("llama", src, tmp_path / "l", shard_size_mb=0.3, progress=False)
    back = convert("internlm2", tmp_path / "l", tmp_path / "b", progress=False)
    assert_identical(state_dict(src), state_dict(back))
    a, b = ModelConfig.from_dir(src), ModelConfig.from_dir(back)
    assert dataclasses.replace(b, source=a.source) == a
    raw = json.loads((back / "config.json").read_text())
    assert raw["architectures"] == ["InternLM2ForCausalLM"] and raw["bias"] is False
    assert "auto_map" not in raw and raw["rope_scaling"] == {"type": "dynamic", "factor": 2.0}


def test_bin_to_safetensors_is_bit_identical(make_ckpt, tmp_path):
    src = make_ckpt(**{**SPEC, "dtype": "bfloat16", "format": "bin", "num_shards": 3})
    out = convert("safetensors", src, tmp_path / "st", shard_size_mb=0.4, progress=False)
    assert not list(out.glob("*.bin")) and (out / "model.safetensors.index.json").is_file()
    assert_identical(state_dict(src), state_dict(out))
    for name in ("config.json", "tokenizer_config.json", "tokenizer.model",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


@pytest.mark.parametrize("fmt,to", [("safetensors", "llama"), ("bin", "safetensors")])
def test_streaming_memory(tmp_path, capsys, fmt, to):
    """Peak RSS growth while converting a >= 300 MB checkpoint stays well under its size."""
    src = write_tiny_checkpoint(tmp_path / "big", TinySpec(
        dtype="float32", hidden_size=768, num_attention_heads=48, num_key_value_heads=8,
        intermediate_size=2048, num_hidden_layers=13, vocab_size=1000, num_shards=3, format=fmt))
    size = sum(p.stat().st_size for p in src.glob(f"*.{fmt}"))
    assert size >= 300e6
    code = f"""
import json, sys
from internlm2_tp.tools.convert import convert
def kib(field):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))
open('/proc/self/clear_refs', 'w').write('5')
before = kib('VmRSS')
convert({to!r}, {str(src)!r}, {str(tmp_path / 'out')!r}, shard_size_mb=16, progress=False)
print(json.dumps({{'growth': (kib('VmHWM') - before) * 1024}}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    frac = json.loads(r.stdout.strip().splitlines()[-1])["growth"] / size
    with capsys.disabled():
        print(f"\nconvert {fmt} to={to} of {size / 2**20:.0f} MiB: peak RSS growth "
              f"{frac:.1%} of the checkpoint")
    assert frac < 0.4
    out_size = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert abs(out_size - size) < 1e6
    shutil.rmtree(src)


def test_refusals(src, llama_dir, make_ckpt, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ConvertError, match="not empty.*overwrite=true"):
        convert("llama", src, busy, progress=False)
    with pytest.raises(ConvertError, match="to=llama needs a checkpoint in the internlm2 layout"):
        convert("llama", llama_dir, tmp_path / "x", progress=False)
    with pytest.raises(ConvertError, match="to=internlm2 needs .* llama layout"):
        convert("internlm2", src, tmp_path / "x", progress=False)
    with pytest.raises(ConvertError, match="already .safetensors"):
        convert("safetensors", src, tmp_path / "x", progress=False)
    with pytest.raises(ConvertError, match="bias=true"):
        convert("llama", make_ckpt(**{**SPEC, "extra": {"bias": True}}), tmp_path / "x",
                progress=False)
    with pytest.raises(ConvertError, match="input directory"):
        convert("llama", src, src, overwrite=True, progress=False)
    assert not (tmp_path / "x").exists()
    ok = ["input=a", "output=b"]
    with pytest.raises(JobConfigError, match="^to: must be one of llama, internlm2, safetensors"):
        parse_args(["to=gguf"] + ok)
    with pytest.raises(JobConfigError, match="^shard_size_mb: "):
        parse_args(["to=llama", "shard_size_mb=big"] + ok)
    with pytest.raises(JobConfigError, match="^inpt: "):
        parse_args(["to=llama", "inpt=a", "output=b"])
    assert parse_args(["to=llama", "overwrite=true"] + ok).overwrite is True


def test_overwrite_replaces_stale_shards(src, tmp_path):
    out = tmp_path / "o"
    convert("llama", src, out, shard_size_mb=0.2, progress=False)
    (out / "notes.txt").write_text("mine")
    convert("llama", src, out, overwrite=True, progress=False)
    assert [p.name for p in out.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_refuses_unknown_target(src, tmp_path):
    r = subprocess.run([sys.executable, "jobs/convert.py", "to=gguf", f"input={src}",
                        f"output={tmp_path / 'o'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "to: must be one of" in r.stderr
