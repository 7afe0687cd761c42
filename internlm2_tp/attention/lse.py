"""Attention pieces that also return their log-sum-exp, and the exact merge of pieces computed
over disjoint key sets (flash-style): how a prefill chunk attends to its cached prefix without a
mask, however long the prefix.

    o, lse = attend(q, k, v, causal, scale)     # q [B, H, L, d], k/v [B, KVH, S, d]
    acc, total = merge(acc, total, o, lse)      # softmax over the union of both key sets

attend() runs a fused kernel that computes no mask and never holds L x S scores where one
returns the log-sum-exp: on CPU aten's flash-attention kernel (the one SDPA picks for fp32/bf16
on CPU, which takes H a multiple of KVH), on CUDA the memory-efficient kernel (KV heads
repeated for it). Elsewhere (an NPU running the plain path, other devices) it computes the
scores in torch, in query-row blocks of at most SCORE_BYTES. causal=True is SDPA's: query i
sees keys <= i (L == S here: a chunk attending to its own keys).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
SCORE_BYTES = 32 << 20    # the torch route's fp32 scores per query-row block
_warned: set[str] = set()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, L, d], k/v [B, KVH, S, d] -> (out [B, H, L, d] in q's dtype, lse [B, H, L]
    fp32, the natural log of each query's sum of exp(scaled scores))."""
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        return o, lse
    if q.device.type == "cuda":
        try:
            return _cuda(q, k, v, causal, scale)
        except RuntimeError as e:   # shapes or dtypes the kernel does not take
            why = f"{q.dtype} head_dim {q.shape[-1]}: {str(e).splitlines()[0][:200]}"
            if why not in _warned:
                _warned.add(why)
                log.warning("memory-efficient attention refused %s; computing in torch", why)
    return attend_torch(q, k, v, causal, scale)


def _cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    o, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale)
    return o, lse[..., :q.shape[2]].float()   # some versions pad lse's length to 32


def attend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                 score_bytes: int = SCORE_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """attend() in plain torch ops, fp32, the query heads of a KV head grouped (no repeat)."""
    b, h, n, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    qg = q.float().view(b, kvh, h // kvh, n, d)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]                    # [B, KVH, 1, S, d]
    rows = max(1, score_bytes // (b * h * s * 4))
    out = torch.empty(b, kvh, h // kvh, n, d, device=q.device)
    lse = torch.empty(b, kvh, h // kvh, n, device=q.device)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        top = i1 if causal else s                    # keys past i1 - 1 are unseen when causal
        sc = torch.matmul(qg[:, :, :, i0:i1], kf[..., :top, :].transpose(-1, -2)) * scale
        if causal:
            seen = torch.arange(top, device=q.device)[None, :] <= \
                torch.arange(i0, i1, device=q.device)[:, None]
            sc.masked_fill_(~seen, float("-inf"))
        lse[..., i0:i1] = torch.logsumexp(sc, -1)
        out[..., i0:i1, :] = torch.matmul(sc.softmax(-1), vf[..., :top, :])
    return out.view(b, h, n, d).to(q.dtype), lse.view(b, h, n)


def merge(acc: torch.Tensor, total: torch.Tensor, o: torch.Tensor, lse: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two softmax-normalised pieces over disjoint keys -> the piece over both. acc [..., L, d]
    fp32 with its lse `total` [..., L]; o [..., L, d] with lse [..., L]. Returns new tensors."""
    new = torch.logaddexp(total, lse)
    acc = acc * torch.exp(total - new)[..., None]
    return acc.add_(o.float() * torch.exp(lse - new)[..., None]), new
