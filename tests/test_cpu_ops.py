"""The CPU op set: its C argmax over the LM head's column-major product gives what torch's
max(dim=-1) gives (value and first index) for every layout the head produces, and anything
else goes the torch way."""
from __future__ import annotations

import pytest
import torch

from internlm2_tp.ops.cpu import CpuOps


@pytest.fixture(scope="module")
def ops() -> CpuOps:
    ops = CpuOps()
    assert ops.argmax_kernel is not None, "the C compiler is part of the test environment"
    return ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 7), (3, 1000), (16, 92544), (256, 4099)])
@pytest.mark.parametrize("threads", [1, 3])
def test_column_argmax_is_max_with_its_first_occurrence(ops: CpuOps, dtype: torch.dtype,
                                                        rows: int, vocab: int,
                                                        threads: int) -> None:
    """Ties across the threads' slices (first wins), a row of -inf but one, an all -inf row,
    and a padded shard's view ([:, :real] of a [V + pad, B] product)."""
    g = torch.Generator().manual_seed(rows * vocab)
    product = torch.randn(vocab + 5, rows, generator=g).to(dtype)           # [V + pad, B]
    x = product.t()[:, :vocab]                                               # [B, V] view
    x[0, vocab // 2] = x[0, vocab - 1] = x[0, 0 if vocab < 3 else 1] = 60.0
    if rows > 2:
        x[1] = float("-inf")
        x[1, vocab - 1] = -1e30
        x[2] = float("-inf")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ops.argmax_kernel(x)
    finally:
        torch.set_num_threads(old)
    want = x.contiguous().max(dim=-1)
    assert got is not None
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_other_layouts_go_the_torch_way(ops: CpuOps) -> None:
    g = torch.Generator().manual_seed(0)
    row_major = torch.randn(4, 300, generator=g)
    assert ops.argmax_kernel(row_major) is None
    assert ops.argmax_kernel(row_major.half().t().contiguous().t()) is None   # fp16
    got, want = ops.row_max(row_major), row_major.max(dim=-1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
