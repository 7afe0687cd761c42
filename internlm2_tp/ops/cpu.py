"""The CPU op set: TorchOps, with greedy sampling's reduction in a small C kernel
(cpu_argmax.c) where the logits are the LM head's column-major product.

The torch path (torch_ops.row_max) reads the [V, B] product several times (block maxima, then
the winning block); the kernel reads it once. Other layouts, dtypes or no kernel: torch.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from internlm2_tp.ops import cbuild
from internlm2_tp.ops.cbuild import C_DTYPES
from internlm2_tp.ops.torch_ops import TorchOps, row_max

SOURCE = Path(__file__).with_name("cpu_argmax.c")


class ColumnArgmax:
    def __init__(self, lib: ctypes.CDLL):
        f = lib.col_argmax
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 2 + [
            ctypes.c_int64]
        self.fn = f

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(max, first index) of each row of x [B, V] when x is a column-major CPU view
        (stride (1, ld)) of fp32/bf16; None otherwise."""
        b, v = x.shape
        if (x.device.type != "cpu" or x.dtype not in C_DTYPES or x.stride(0) != 1 or b < 1
                or v < 1 or x.stride(1) < b):
            return None
        vals = torch.empty(b, dtype=torch.float32)
        idx = torch.empty(b, dtype=torch.long)
        rc = self.fn(x.data_ptr(), v, b, x.stride(1), C_DTYPES[x.dtype], vals.data_ptr(),
                     idx.data_ptr(), torch.get_num_threads())
        return (vals.to(x.dtype), idx) if rc == 0 else None


class CpuOps(TorchOps):
    name = "cpu"

    def __init__(self) -> None:
        lib = cbuild.load(SOURCE)
        self.argmax_kernel = None if lib is None else ColumnArgmax(lib)

    def row_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        got = self.argmax_kernel(x) if self.argmax_kernel is not None else None
        return got if got is not None else row_max(x)


__all__ = ["ColumnArgmax", "CpuOps"]
