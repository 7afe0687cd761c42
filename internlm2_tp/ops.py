"""Per-op dispatch: each op is one function with the torch_npu fused kernel where one exists and
the plain-torch path as the fallback (and the reference the device tests compare against).

`fused` is decided once per model (device type npu and torch_npu importable); nothing here
imports torch_npu unless asked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from internlm2_tp.rotary import apply_rotary_plain


def npu_ops() -> object | None:
    """torch_npu when importable, else None (the plain path is used)."""
    try:
        import torch_npu
    except ImportError:
        return None
    return torch_npu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: object | None = None
             ) -> torch.Tensor:
    """RMSNorm in fp32 as the official model: normalize in fp32, cast back, then scale."""
    if fused is not None:
        return fused.npu_rms_norm(x, weight, epsilon=eps)[0]
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 fused: object | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """residual + x, then RMSNorm of the sum: returns (normed, new residual)."""
    h = residual + x
    return rms_norm(h, weight, eps, fused), h


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 fused: object | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, d], k [T, KVH, d], cos/sin [T, d] (rotate-half convention)."""
    if fused is not None:
        c, s = cos[:, None, :], sin[:, None, :]
        return fused.npu_rotary_mul(q, c, s), fused.npu_rotary_mul(k, c, s)
    return apply_rotary_plain(q, k, cos, sin)


def silu_and_mul(gate_up: torch.Tensor, fused: object | None = None) -> torch.Tensor:
    """[.., 2n] (gate | up) -> silu(gate) * up [.., n]."""
    if fused is not None:
        return fused.npu_swiglu(gate_up, dim=-1)
    n = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :n]) * gate_up[..., n:]
