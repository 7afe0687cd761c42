"""The reference op set: plain torch, and oneDNN-packed matmul weights on CPU.

Each op is one function (the model calls them through an op set chosen once from the platform:
TorchOps here, NpuOps in npu.py); these functions are also the reference the device paths are
compared against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN_OK: bool | None = None


def _onednn_linear_ok() -> bool:
    """Whether torch's oneDNN linear (the op its own compiler emits for CPU linears) exists here
    and agrees with F.linear on a probe; decided once per process."""
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        try:
            g = torch.Generator().manual_seed(0)
            w, x = torch.randn(48, 40, generator=g), torch.randn(5, 40, generator=g)
            y = torch.ops.mkldnn._linear_pointwise(x, _reorder(w), None, "none", [], "")
            _ONEDNN_OK = bool(torch.backends.mkldnn.is_available()) and torch.allclose(
                y, F.linear(x, w), rtol=1e-4, atol=1e-4)
        except (AttributeError, RuntimeError):
            _ONEDNN_OK = False
    return _ONEDNN_OK


def packs_linear_weight(weight: torch.Tensor) -> bool:
    """Whether pack_linear_weight() re-lays this weight out (decided without doing it)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and _onednn_linear_ok())


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A CPU weight [out, in] repacked in oneDNN's blocked layout for `linear`, or None where
    that does not apply (devices, fp16, no oneDNN). Measured on a 2-core AVX2 EPYC in fp32:
    1.3x (256 rows) to 2x (16-64 rows, the decode shapes) the GFLOP/s of F.linear (MKL), as
    oneDNN's kernels keep the packed weight streaming instead of re-laying it out per call."""
    return _reorder(weight) if packs_linear_weight(weight) else None


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's own blocked layout for the weight, chosen for 64-row inputs (decode batches);
    measured 5-40% faster than the plain layout from 64 to 1024 rows, which oneDNN would
    otherwise re-block on every call."""
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    return reorder(weight, 64) if reorder is not None else weight.to_mkldnn()


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None
           ) -> torch.Tensor:
    """x [.., in] @ weight[out, in]^T -> [.., out]; through oneDNN when the weight was packed."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")
    return F.linear(x, weight)


def head_by_weight(weight: torch.Tensor) -> bool:
    """Whether the LM head runs as weight @ x^T on the plain weight (lm_head below): bf16 on
    CPU. Measured on 2 AMX cores (bf16, vocab 92544 x 1536): 14 / 20 / 58 ms at 16 / 64 / 256
    rows against 17 / 25 / 63 ms through the packed weight; the vocab-sized weight is the A
    operand the kernel streams once. fp32 keeps the packed path (measured on AVX2 CPUs)."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16


class HeadWorkspace:
    """The LM head's output buffer, reused step after step. glibc serves a block over its mmap
    threshold (32 MiB at most) with fresh pages and unmaps it on free, so a [V, B] product of
    that size (92544 x 256 bf16: 47 MB) costs a page fault per 4 KiB every decode step, about
    as long as the matmul's own memory traffic. Reused for decode-sized batches only (up to
    MAX_ROWS rows): a prefill that scores every prompt token allocates its product as before,
    instead of holding it for the rest of the job."""

    MAX_ROWS = 1024

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def take(self, like: torch.Tensor, vocab: int, batch: int) -> torch.Tensor | None:
        """A [vocab, batch] tensor of like's dtype and device (valid until the next take), or
        None: allocate as usual."""
        if batch > self.MAX_ROWS:
            return None
        need = vocab * batch
        b = self.buf
        if b is None or b.numel() < need or b.dtype != like.dtype or b.device != like.device:
            self.buf = b = like.new_empty(need)
        return b[:need].view(vocab, batch)


def lm_head(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None,
            workspace: HeadWorkspace | None = None) -> torch.Tensor:
    """Logits [B, V] of x [B, in]: where head_by_weight, a [B, V] view of the [V, B] product
    weight @ x^T (column-major; row_max and the head's gather take it as it is), else linear.
    With a workspace the product lives in its buffer: valid until the next call."""
    if packed is None and head_by_weight(weight):
        out = workspace.take(weight, weight.shape[0], x.shape[0]) if workspace else None
        return torch.mm(weight, x.t(), out=out).t()
    return linear(x, weight, packed)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 as the official model: normalize in fp32, cast back, then scale.
    F.rms_norm without a weight does the first two in one call (upcast, mean of squares,
    rsqrt, cast back: the same bits as spelling them out), the weight multiplies after."""
    return F.rms_norm(x, (x.shape[-1],), None, eps) * weight


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, index of its first occurrence) of each row of x [B, V], as x.max(dim=-1), from
    amax over blocks of up to 128 logits (the largest power of two dividing V): torch's
    max(dim) over a long bf16/fp32 row runs several times slower than amax, and a vocab-sized
    row per sampled token is the largest reduction of a decode step."""
    b, v = x.shape
    blk = min(128, v & -v)
    if blk < 16 or v == blk:
        return x.max(dim=-1)
    if x.stride(-1) != 1:
        return _col_max(x.t(), blk) if x.stride(0) == 1 else x.max(dim=-1)
    blocks = x.view(b, v // blk, blk)
    block_max = blocks.amax(-1)                                                  # [B, V/blk]
    top = block_max.amax(-1, keepdim=True)                                       # [B, 1]
    first = (block_max == top).to(torch.uint8).argmax(-1)                        # [B]
    block = blocks[torch.arange(b, device=x.device), first]                      # [B, blk]
    within = (block == top).to(torch.uint8).argmax(-1)
    return top.squeeze(1), first * blk + within


def _col_max(xt: torch.Tensor, blk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """row_max of xt.t() for xt [V, B] with unit row stride (lm_head's product), reducing
    over V in the layout it has."""
    v, b = xt.shape
    if xt.stride(0) != b:
        return xt.t().max(dim=-1)
    blocks = xt.view(v // blk, blk, b)
    block_max = blocks.amax(1)                                                   # [V/blk, B]
    top = block_max.amax(0, keepdim=True)                                        # [1, B]
    first = (block_max == top).to(torch.uint8).argmax(0)                         # [B]
    block = blocks[first, :, torch.arange(b, device=xt.device)]                  # [B, blk]
    within = (block == top.t()).to(torch.uint8).argmax(-1)
    return top.squeeze(0), first * blk + within


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, d], k [T, KVH, d], cos/sin [T, d] (rotate-half convention)."""
    c, s = cos[:, None, :], sin[:, None, :]
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[.., 2n] (gate | up) -> silu(gate) * up [.., n]."""
    n = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :n]) * gate_up[..., n:]


class TorchOps:
    """The reference op set in plain torch (CPU, CUDA, and what the NPU set is checked against).
    On CPU the matmul weights are repacked for oneDNN after loading."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, k, cos, sin)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)

    def row_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return row_max(x)

    def packs_head_weight(self, weight: torch.Tensor) -> bool:
        return packs_linear_weight(weight) and not head_by_weight(weight)

    def lm_head(self, x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                workspace: HeadWorkspace | None = None) -> torch.Tensor:
        return lm_head(x, weight, packed, workspace)

    def packs_linear_weight(self, weight: torch.Tensor) -> bool:
        return packs_linear_weight(weight)

    def pack_linear_weight(self, weight: torch.Tensor) -> torch.Tensor | None:
        return pack_linear_weight(weight)
