"""Vectorized, rank-deterministic token sampling for a running batch.

Every tensor-parallel rank calls :func:`sample` with bitwise-identical full-vocab
fp32 logits and must pick the same token.  Randomness is therefore a pure function
of ``(row seed, index of the token being generated)``: a splitmix64-style hash
computed with int64 torch ops (no global RNG, no shared ``torch.Generator``), so a
row yields the same tokens whatever batch it is in and wherever it sits in it.

Per step there are no per-row Python loops: the batch is handled by a few [B] / [B, V]
tensor ops.  Filters use partial ``torch.topk``; the full vocab is sorted only for a
top-p row whose nucleus does not fit in its best TOP_P_WINDOW logits.  The draw is an
inverse CDF in vocab order (cumsum + searchsorted).  Greedy rows take the argmax; an
all-greedy batch is one argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from internlm2_tp.engine.params import SamplingParams


def _s64(c: int) -> int:
    """Reinterpret an unsigned 64-bit constant as a signed int64."""
    return c - (1 << 64) if c >= (1 << 63) else c


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MIX1 = _s64(0xBF58476D1CE4E5B9)
_MIX2 = _s64(0x94D049BB133111EB)


# ---------------------------------------------------------------------------- RNG
def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64: arithmetic shift, then mask off the sign fill."""
    return torch.bitwise_and(torch.bitwise_right_shift(x, s), (1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 (multiplication wraps modulo 2**64)."""
    z = torch.bitwise_xor(z, _shr(z, 30)) * _MIX1
    z = torch.bitwise_xor(z, _shr(z, 27)) * _MIX2
    return torch.bitwise_xor(z, _shr(z, 31))


def hash_bits(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """64 pseudo-random bits (as int64) that depend only on (seed, step), elementwise."""
    seed, step = torch.broadcast_tensors(seed.to(torch.int64), step.to(torch.int64))
    k = _mix64(seed + _GOLDEN)
    return _mix64(torch.bitwise_xor(k, (step + 1) * _GOLDEN))


def hash_uniform(seed: torch.Tensor, step: torch.Tensor, bits: int = 24) -> torch.Tensor:
    """Uniform in [0, 1) from the top ``bits`` hash bits; exact (never rounds to 1).

    bits <= 24 gives float32, 25..53 gives float64.
    """
    if not 1 <= bits <= 53:
        raise ValueError(f"bits must be in [1, 53], got {bits}")
    dtype = torch.float32 if bits <= 24 else torch.float64
    return _shr(hash_bits(seed, step), 64 - bits).to(dtype) * (2.0 ** -bits)


# ---------------------------------------------------------------------------- state
@dataclass
class BatchSamplingState:
    temperature: torch.Tensor   # [B] float32, 0 for greedy rows
    top_p: torch.Tensor         # [B] float32
    top_k: torch.Tensor         # [B] int64, 0 = off
    penalty: torch.Tensor       # [B] float32
    seed: torch.Tensor          # [B] int64
    all_greedy: bool
    any_greedy: bool
    max_top_k: int              # max over rows (0 if none): width of the top-k fast path
    any_top_p: bool
    any_top_k: bool
    any_penalty: bool

    @classmethod
    def build(cls, params: list[SamplingParams],
              device: torch.device | str | None = None) -> "BatchSamplingState":
        def t(vals, dtype):
            return torch.tensor(vals, dtype=dtype, device=device)

        return cls(
            temperature=t([p.temperature for p in params], torch.float32),
            top_p=t([p.top_p for p in params], torch.float32),
            top_k=t([p.top_k for p in params], torch.int64),
            penalty=t([p.repetition_penalty for p in params], torch.float32),
            seed=t([p.seed for p in params], torch.int64),
            all_greedy=all(p.greedy for p in params),
            any_greedy=any(p.greedy for p in params),
            max_top_k=max((p.top_k for p in params), default=0),
            any_top_p=any(p.top_p < 1 and not p.greedy for p in params),
            any_top_k=any(p.top_k > 0 and not p.greedy for p in params),
            any_penalty=any(p.repetition_penalty != 1 for p in params),
        )

    def to(self, device: torch.device | str) -> "BatchSamplingState":
        tensors = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return BatchSamplingState(**{**vars(self), **tensors})


# ---------------------------------------------------------------------------- sampling
def apply_repetition_penalty(logits: torch.Tensor, penalty: torch.Tensor,
                             prev_token_ids: torch.Tensor) -> torch.Tensor:
    """HF semantics: seen tokens get logit/p if logit > 0 else logit*p. Returns a new tensor."""
    b, v = logits.shape
    ids = prev_token_ids.to(device=logits.device, dtype=torch.int64)
    ids = torch.where((ids < 0) | (ids >= v), v, ids)          # padding -> spare column
    seen = torch.zeros(b, v + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, ids, True)
    p = penalty.to(logits.device, logits.dtype).unsqueeze(1)
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen[:, :v], penalized, logits)


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _below(total: torch.Tensor) -> torch.Tensor:
    """The largest float below each (positive, finite) total: nextafter(total, 0) by stepping
    its bit pattern down one (torch.nextafter has no NPU kernel and falls back to the CPU)."""
    bits = _SAME_WIDTH_INT[total.dtype]
    return (total.contiguous().view(bits) - 1).view(total.dtype)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u*total < cdf[i]; zero-probability entries never win."""
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(u.to(cdf.dtype).unsqueeze(1) * total, _below(total))
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=probs.shape[-1] - 1)


# Top-p looks at the best TOP_P_WINDOW logits first (a partial top-k, not a sort of the vocab);
# only a row whose nucleus is not complete inside the window is sorted in full.
TOP_P_WINDOW = 1024


def _nucleus(ordered: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """ordered [B, W] logits, best first (-inf = cut); lse [B, 1] the log of the row's total
    mass. -> (threshold [B, 1]: the lowest kept logit, complete [B, 1]: the kept prefix ends
    inside these W columns, which is always true when W is the whole vocab)."""
    cum = torch.cumsum(torch.exp(ordered - lse), dim=-1)
    mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # monotone
    keep = ((mass_before < top_p) | (top_p >= 1)) & (ordered > float("-inf"))
    n_keep = keep.sum(dim=-1, keepdim=True).clamp(min=1)  # keep is a prefix; >= 1 token
    return ordered.gather(1, n_keep - 1), cum[:, -1:] >= top_p


def _filter_threshold(scaled: torch.Tensor, state: BatchSamplingState) -> torch.Tensor:
    """[B, 1] lowest kept logit after top-k then top-p (-inf where a row keeps all).

    Every row's threshold is a function of that row alone (which path computes it depends only
    on the row), so a row samples the same in any batch."""
    dev, v = scaled.device, scaled.shape[-1]
    neg_inf = torch.tensor(float("-inf"), device=dev)
    k = state.top_k.to(dev).clamp(max=v).unsqueeze(1)                       # [B, 1]
    if not state.any_top_p:  # top-k only: a partial top-k instead of a full sort
        vals = torch.topk(scaled, min(state.max_top_k, v), dim=-1).values
        kth = vals.gather(1, (k - 1).clamp(min=0))
        return torch.where(k > 0, kth, neg_inf)
    top_p = state.top_p.to(dev).unsqueeze(1)
    width = min(v, max(TOP_P_WINDOW, state.max_top_k + 64))
    ordered = torch.topk(scaled, width, dim=-1).values                       # [B, W] sorted
    if state.any_top_k:  # cut below the k-th value (ties at the boundary kept, as in HF)
        kth = ordered.gather(1, (k - 1).clamp(min=0))
        ordered.masked_fill_((k > 0) & (ordered < kth), float("-inf"))
    # The nucleus is taken within what top-k kept (all of it lies in the window), else the row.
    lse = torch.where(k > 0, torch.logsumexp(ordered, -1, keepdim=True),
                      torch.logsumexp(scaled, -1, keepdim=True))
    thr, complete = _nucleus(ordered, lse, top_p)
    complete |= (k > 0) | (top_p >= 1) | (width == v)
    thr = torch.where((top_p >= 1) & (k == 0), neg_inf, thr)
    rows = (~complete.squeeze(1)).nonzero().squeeze(1)
    if rows.numel():  # flat rows whose nucleus spills past the window: sort them in full
        full = torch.sort(scaled[rows], dim=-1, descending=True).values
        thr[rows] = _nucleus(full, lse[rows], top_p[rows])[0]
    return thr


def sample(logits: torch.Tensor, state: BatchSamplingState, step: torch.Tensor,
           prev_token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row. logits [B, V] fp32, step [B] int64 -> [B] int64."""
    dev = logits.device
    if state.any_penalty:
        if prev_token_ids is None:
            raise ValueError("prev_token_ids is required when a row has repetition_penalty != 1")
        logits = apply_repetition_penalty(logits, state.penalty, prev_token_ids)
    if state.all_greedy:
        return torch.argmax(logits, dim=-1)

    temp = state.temperature.to(dev)
    greedy = temp == 0
    # Subtract the row max before dividing so a tiny temperature cannot overflow to inf.
    row_max = logits.max(dim=-1, keepdim=True).values
    scaled = (logits - row_max) / torch.where(greedy, 1.0, temp).unsqueeze(1)
    step = step.to(dev)
    u = hash_uniform(state.seed.to(dev), step)

    if state.any_top_k or state.any_top_p:
        # Filters become a per-row logit threshold (keep scaled >= thr, ties at the
        # boundary kept, as in HF). Thresholds are exact element values, so the top-k
        # fast path and the full-sort path agree bitwise and every row, filtered or
        # not, draws by inverse CDF in vocab order (independent of the batch).
        scaled.masked_fill_(scaled < _filter_threshold(scaled, state), float("-inf"))
    # scaled <= 0, so exp() cannot overflow; _inverse_cdf normalises by the total itself.
    picked = _inverse_cdf(torch.exp(scaled), u)

    if state.any_greedy:
        picked = torch.where(greedy, torch.argmax(logits, dim=-1), picked)
    return picked
