"""The CPU decode-attention kernel (cpu_decode.c), built and loaded by ops/cbuild.py.

Why a kernel: on CPU, the plain path copies every decode row's blocks out of the cache
(index_select) before SDPA reads them again, and at a few hundred rows that traffic costs more
than the layer's matmuls. The kernel reads keys and values in place, once.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from internlm2_tp.ops import cbuild
from internlm2_tp.ops.cbuild import C_DTYPES

SOURCE = Path(__file__).with_name("cpu_decode.c")
# Vectorizing the dot products and sums needs reassociation; the source uses no infinity.
FLAGS = ("-ffast-math",)


class DecodeKernel:
    """decode(q, k_cache, v_cache, tables, ctx, out, scale) -> bool (False: not handled)."""

    def __init__(self, lib: ctypes.CDLL):
        f = lib.decode_attention
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float,
                                                                     ctypes.c_int64]
        self.fn = f

    @staticmethod
    def supports(cache: torch.Tensor, num_heads: int) -> bool:
        """The kernel's limits (cpu_decode.c): fp32 or bf16, head_dim a multiple of 16 up to
        256, up to 16 query heads per KV head, blocks of up to 256 keys."""
        _, bs, kvh, d = cache.shape
        return (cache.device.type == "cpu" and cache.dtype in C_DTYPES and cache.is_contiguous()
                and d % 16 == 0 and d <= 256 and num_heads % kvh == 0
                and num_heads // kvh <= 16 and bs <= 256)

    def decode(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
               tables: torch.Tensor, ctx: torch.Tensor, out: torch.Tensor, scale: float) -> bool:
        """q [rows, H, d] (contiguous) -> out [rows, H*d] (contiguous), in place."""
        rows, heads, d = q.shape
        _, bs, kvh, _ = kv[0].shape
        tables, ctx = tables.contiguous(), ctx.contiguous()
        assert tables.dtype == ctx.dtype == torch.int64 and out.is_contiguous()
        rc = self.fn(q.data_ptr(), kv[0].data_ptr(), kv[1].data_ptr(), tables.data_ptr(),
                     ctx.data_ptr(), out.data_ptr(), rows, kvh, heads // kvh, d, bs,
                     tables.shape[1], C_DTYPES[q.dtype], scale, torch.get_num_threads())
        return rc == 0


def load() -> DecodeKernel | None:
    """The kernel, or None (disabled, or it cannot be built here: warned once)."""
    lib = cbuild.load(SOURCE, FLAGS)
    return None if lib is None else DecodeKernel(lib)
