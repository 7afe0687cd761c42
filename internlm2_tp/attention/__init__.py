"""Attention over the paged KV cache: the step's metadata and one backend per op set.

The model asks its platform for a backend once; per step it calls `backend.prepare(meta, cache,
num_heads)` (host-side planning, stored in meta.plan), then `backend.forward(q, k, v, kv, meta,
scale)` in every layer. TorchAttention (torch_backend.py) is the plain path; NpuAttention
(npu_backend.py) runs torch_npu's fused kernels and falls back to the plain path for a phase
whose shapes they do not document.
"""
from __future__ import annotations

from internlm2_tp.attention.metadata import AttentionMetadata, dense_metadata
from internlm2_tp.attention.torch_backend import TorchAttention, gather_kv, write_kv

__all__ = ["AttentionMetadata", "TorchAttention", "dense_metadata", "gather_kv", "write_kv"]
