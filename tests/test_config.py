"""config.py: which dtype `model.dtype=auto` picks, per device and CPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from internlm2_tp import config as config_mod
from internlm2_tp.config import ModelConfig, cpu_has_fast_bf16, resolve_dtype
from internlm2_tp.errors import JobConfigError

BASE = dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, intermediate_size=512,
            num_hidden_layers=1, vocab_size=100, rms_norm_eps=1e-5, rope_theta=1e6,
            max_position_embeddings=64)


def cfg(dtype: str) -> ModelConfig:
    return ModelConfig.from_dict({**BASE, "torch_dtype": dtype})


@pytest.mark.parametrize("flags,fast", [("fpu avx2 fma", False), ("avx2 avx512f avx512_bf16", True),
                                        ("avx2 amx_bf16 amx_tile", True), ("avx512f avx512bw", False)])
def test_cpu_bf16_detection(tmp_path: Path, flags: str, fast: bool) -> None:
    f = tmp_path / "cpuinfo"
    f.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_has_fast_bf16(str(f)) is fast


@pytest.mark.parametrize("fast", [True, False])
def test_auto_dtype_on_cpu(monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    monkeypatch.setattr(config_mod, "cpu_has_fast_bf16", lambda: fast)
    half = torch.bfloat16 if fast else torch.float32
    assert resolve_dtype("auto", cfg("bfloat16"), "cpu") == half
    assert resolve_dtype("auto", cfg("float16"), "cpu") == half
    assert resolve_dtype("auto", cfg("float32"), "cpu") == torch.float32
    # Devices run the checkpoint's dtype; an explicit dtype is always obeyed.
    assert resolve_dtype("auto", cfg("float16"), "cuda") == torch.float16
    assert resolve_dtype("auto", cfg("bfloat16"), "npu") == torch.bfloat16
    assert resolve_dtype("bfloat16", cfg("float32"), "cpu") == torch.bfloat16


def test_bad_dtype_named() -> None:
    with pytest.raises(JobConfigError, match="model.dtype"):
        resolve_dtype("int8", cfg("float32"), "cpu")
