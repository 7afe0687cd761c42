"""The plain op set: each fast form gives the same bits as the textbook form it replaces."""
from __future__ import annotations

import pytest
import torch

from internlm2_tp.ops import HeadWorkspace, apply_rotary, head_by_weight, lm_head, rms_norm, row_max
from internlm2_tp.ops.torch_ops import rotate_half


def official_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """InternLM2's RMSNorm, spelled out: normalize in fp32, cast back, times the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_bitwise_the_official_math(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 1536, generator=g) * 4).to(dtype)
    w = torch.randn(1536, generator=g).to(dtype)
    assert torch.equal(rms_norm(x, w, 1e-5), official_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(3, 1280), (64, 92544), (4, 46272), (5, 1000),
                                        (2, 128), (3, 96), (1, 7)])
def test_row_max_is_max_with_its_first_occurrence(dtype, rows, vocab):
    """Ties (first one wins, in the same block and across blocks), all-negative rows,
    sizes that are not a multiple of a block, and a strided view of a padded shard."""
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab + 13, generator=g).to(dtype)[:, :vocab]
    x[0, min(7, vocab - 1)] = x[0, vocab - 1] = 50.0
    if rows > 2:
        x[2] = -3.0
        x[2, 60 % vocab] = x[2, 61 % vocab] = x[2, 90 % vocab] = -1.0
    for t in (x, x.contiguous()):
        got, want = row_max(t), t.max(dim=-1)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rotary_is_rotate_half():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 6, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    ang = torch.randn(5, 4, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rq, rk = apply_rotary(q, k, cos, sin)
    assert torch.equal(rq, q * cos[:, None] + rotate_half(q) * sin[:, None])
    assert torch.equal(rk, k * cos[:, None] + rotate_half(k) * sin[:, None])


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_lm_head_view_and_its_row_max(rows):
    """bf16 on CPU: the logits are a [B, V] view of weight @ x^T, equal to F.linear's within
    one bf16 rounding, and row_max reads that column-major layout as it is."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(4096, 64, generator=g).bfloat16()
    x = torch.randn(rows, 64, generator=g).bfloat16()
    logits = lm_head(x, w)
    assert head_by_weight(w) and logits.shape == (rows, 4096) and logits.stride(0) == 1
    ref = torch.nn.functional.linear(x.float(), w.float())
    torch.testing.assert_close(logits.float(), ref, rtol=1e-2, atol=0.1)
    logits[0, 5] = logits[0, 4000] = 1000.0          # a tie across blocks: the first wins
    got, want = row_max(logits), logits.contiguous().max(dim=-1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not head_by_weight(w.float())             # fp32 keeps the packed path


def test_lm_head_workspace_reuses_one_buffer_for_decode_batches():
    """The head's product goes to one reused buffer (no fresh pages per step): the same
    logits bit for bit; a smaller batch takes the front of it; a batch over MAX_ROWS (a
    prefill scoring every prompt token) allocates its own and the buffer is not grown."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 64, generator=g).bfloat16()
    ws = HeadWorkspace()
    x = torch.randn(64, 64, generator=g).bfloat16()
    first = lm_head(x, w, workspace=ws)
    assert torch.equal(first, lm_head(x, w)) and first.data_ptr() == ws.buf.data_ptr()
    small = lm_head(x[:16], w, workspace=ws)
    assert torch.equal(small, lm_head(x[:16], w)) and small.data_ptr() == ws.buf.data_ptr()
    size = ws.buf.numel()
    big = torch.randn(HeadWorkspace.MAX_ROWS + 1, 64, generator=g).bfloat16()
    out = lm_head(big, w, workspace=ws)
    assert torch.equal(out, lm_head(big, w)) and out.data_ptr() != ws.buf.data_ptr()
    assert ws.buf.numel() == size
