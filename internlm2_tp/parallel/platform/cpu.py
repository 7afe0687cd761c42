"""Plain CPUs."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

from internlm2_tp.parallel.platform.base import Platform

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Step-sized tensors (a prefill's [4096, 8192] bf16 MLP activation is 64 MiB) stay in the heap;
# larger ones (a scoring step's fp32 logits) still get their own mapping, returned on free.
HEAP_UP_TO = 256 << 20


def keep_step_buffers_in_heap() -> bool:
    """Have glibc reuse freed step-sized buffers instead of mapping fresh pages for each.

    By default glibc serves blocks over its mmap threshold (at most 32 MiB, adjusted upward
    as blocks are freed) with new pages and unmaps them on free, so every activation of a big
    step pays one page fault per 4 KiB it touches, often costing more than the op computing
    it. Returns False (and changes nothing) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt here; allocator left as it is")
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_UP_TO)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * HEAP_UP_TO))


class CpuPlatform(Platform):
    """Plain CPUs: the torch op set (matmul weights repacked for oneDNN) with the C kernels
    (decode attention, greedy argmax) where they build, glibc's heap kept for step buffers,
    gloo."""
    kind = "cpu"

    def prepare_process(self) -> None:
        keep_step_buffers_in_heap()

    def ops(self) -> Any:
        from internlm2_tp.ops.cpu import CpuOps
        return CpuOps()

    def attention(self) -> Any:
        """The plain backend, with decode rows through the compiled CPU kernel when this
        machine can build it (attention/cpu_kernel.py)."""
        from internlm2_tp.attention import TorchAttention
        from internlm2_tp.attention.cpu_kernel import load

        return TorchAttention(self.to_device, decode_kernel=load())
