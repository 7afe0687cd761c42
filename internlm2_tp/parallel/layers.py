"""Tensor-parallel layers, each with its weight loader beside it, so the per-rank shapes are in
`__init__` and the slicing rules are next to them. Every layer loads the same way:
`load(reader, names)` with the checkpoint tensor name(s) it is made of (model.WEIGHT_NAMES).

No layer communicates on its own: the ones whose output is a partial sum (RowParallelLinear,
VocabParallelEmbedding) or a vocab shard (ParallelLMHead) say so, and the model calls the
collective explicitly.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from internlm2_tp.checkpoint import CheckpointReader
from internlm2_tp.config import kv_heads_per_rank
from internlm2_tp.ops import HeadWorkspace, TorchOps, linear
from internlm2_tp.parallel.group import TPGroup

CPU_OPS = TorchOps()   # layers built without a model (tests, tools) pack as the CPU does
RowMax = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _max_last(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.max(dim=-1)


class StagingPool:
    """Dense memory for weights that are loaded only to be re-laid out (pack()): a buffer freed
    by one layer's pack() takes the next layer's weight, instead of fresh pages per tensor.
    First touch of fresh memory was half the load time (0.2 s per 100M fp32 params on the
    2-core EPYC; a warm copy is 0.04 s)."""

    def __init__(self) -> None:
        self.free: list[torch.Tensor] = []   # flat buffers

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = shape.numel()
        fits = [i for i, b in enumerate(self.free) if b.numel() >= n and b.dtype == dtype
                and b.device == device]
        if fits:
            buf = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        else:
            # Nothing free is big enough: drop the free buffers (this one serves their sizes
            # from now on), so the pool peaks at the largest weights staged at once.
            self.free.clear()
            buf = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def give(self, view: torch.Tensor) -> None:
        self.free.append(view._base if view._base is not None else view.view(-1))


class ShardedLinear(nn.Module):
    """Base: a bias-free weight [out_local, in_local]; subclasses add `load(reader, names)`."""

    packable = True   # a matmul weight, re-laid out for oneDNN on CPU after loading

    def __init__(self, out_local: int, in_local: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=dtype, device=device),
                                   requires_grad=False)
        self.packed: torch.Tensor | None = None   # oneDNN layout on CPU, see pack()

    def packs(self, ops: Any, weight: torch.Tensor) -> bool:
        """Whether pack() re-lays this weight out under `ops`."""
        return self.packable and ops.packs_linear_weight(weight)

    def stage(self, pool: StagingPool, ops: Any = CPU_OPS) -> None:
        """Before loading: take the dense weight from `pool` when pack() will re-lay it out (it
        is only a staging area then)."""
        w = self.weight.data
        if w.numel() and self.packs(ops, w):
            self.weight.data = pool.take(w.shape, w.dtype, w.device)

    def pack(self, pool: StagingPool | None = None, ops: Any = CPU_OPS) -> None:
        """After loading, where the op set repacks matmul weights (CPU: oneDNN's layout, faster
        matmuls, no second copy in memory): keep only the packed copy and hand the dense memory
        back to `pool`. A no-op elsewhere."""
        packed = ops.pack_linear_weight(self.weight.data) if self.packs(ops, self.weight.data) \
            else None
        if packed is not None:
            self.packed = packed
            if pool is not None:
                pool.give(self.weight.data)
            self.weight.data = self.weight.data.new_empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed)


class MergedColumnParallelLinear(ShardedLinear):
    """Column-parallel weights (output rows split evenly over the ranks) stacked into one matmul
    (gate and up: w1, w3). Local layout: [part0 rows of this rank | part1 rows of this rank | ...]."""

    def __init__(self, in_features: int, out_features: list[int], tp: TPGroup, dtype: torch.dtype,
                 device: torch.device):
        assert all(o % tp.size == 0 for o in out_features), (out_features, tp.size)
        self.locals = [o // tp.size for o in out_features]
        super().__init__(sum(self.locals), in_features, dtype, device)
        self.out_features, self.in_features, self.tp = out_features, in_features, tp

    def load(self, reader: CheckpointReader, names: tuple[str, ...]) -> None:
        """One checkpoint tensor per part, in order."""
        start = 0
        for name, full, n in zip(names, self.out_features, self.locals, strict=True):
            reader.expect_shape(name, (full, self.in_features))
            lo = self.tp.rank * n
            self.weight.data[start:start + n].copy_(reader.read(name, rows=(lo, lo + n)))
            start += n


class RowParallelLinear(ShardedLinear):
    """Input columns split: rank r holds W[:, r*in/tp : (r+1)*in/tp]. The output is this rank's
    PARTIAL SUM: the caller all-reduces it."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device):
        assert in_features % tp.size == 0, (in_features, tp.size)
        self.in_local = in_features // tp.size
        super().__init__(out_features, self.in_local, dtype, device)
        self.full_shape = (out_features, in_features)
        self.tp = tp

    def load(self, reader: CheckpointReader, names: tuple[str, ...]) -> None:
        (name,) = names
        reader.expect_shape(name, self.full_shape)
        lo = self.tp.rank * self.in_local
        self.weight.data.copy_(reader.read(name, cols=(lo, lo + self.in_local)))


class QKVParallelLinear(ShardedLinear):
    """InternLM2's fused wqkv, de-interleaved at load time into [Q_local | K_local | V_local].

    Checkpoint rows are grouped per KV head: [kv_heads, q_per_kv + 2, head_dim, hidden] (the
    group's q heads, its k head, its v head). Rank r owns q heads [r*H/tp, (r+1)*H/tp), which
    always belong to whole KV groups when tp <= kv_heads (then it owns KV heads
    [r*kv/tp, (r+1)*kv/tp), one contiguous block of rows), or to one group when tp > kv_heads
    (then that group's KV head, r // (tp/kv), is replicated on tp/kv ranks).
    """

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device):
        self.heads, self.kv_heads, self.head_dim, self.hidden = heads, kv_heads, head_dim, hidden
        self.g = heads // kv_heads
        self.q_local = heads // tp.size
        self.kv_local = kv_heads_per_rank(kv_heads, tp.size)
        self.q0 = tp.rank * self.q_local                      # first q head of this rank
        self.kv0 = self.q0 // self.g                          # first KV head of this rank
        rows = (self.q_local + 2 * self.kv_local) * head_dim
        super().__init__(rows, hidden, dtype, device)
        self.tp = tp

    @property
    def q_size(self) -> int:
        return self.q_local * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_local * self.head_dim

    def load(self, reader: CheckpointReader, names: tuple[str, ...]) -> None:
        """InternLM2's fused `wqkv` (one name) or the Llama layout's q, k, v projections."""
        if len(names) == 1:
            self._load_fused(reader, names[0])
        else:
            self._load_split(reader, *names)

    def _load_fused(self, reader: CheckpointReader, name: str) -> None:
        """From InternLM2's grouped `wqkv`."""
        d, g, q, kv = self.head_dim, self.g, self.q_size, self.kv_size
        reader.expect_shape(name, ((self.heads + 2 * self.kv_heads) * d, self.hidden))
        w = self.weight.data
        if self.q_local >= g:  # whole groups: one contiguous read, then de-interleave
            lo = self.kv0 * (g + 2) * d
            block = reader.read(name, rows=(lo, lo + self.kv_local * (g + 2) * d))
            block = block.view(self.kv_local, g + 2, d, self.hidden)  # [groups, g+2, d, hidden]
            w[:q].copy_(block[:, :g].reshape(q, self.hidden))
            w[q:q + kv].copy_(block[:, g].reshape(kv, self.hidden))
            w[q + kv:].copy_(block[:, g + 1].reshape(kv, self.hidden))
        else:  # part of one group: our q heads, and the group's k and v heads (replicated)
            base = self.kv0 * (g + 2) * d
            j = self.q0 - self.kv0 * g  # our first q head inside the group
            w[:q].copy_(reader.read(name, rows=(base + j * d, base + j * d + q)))
            w[q:q + kv].copy_(reader.read(name, rows=(base + g * d, base + (g + 1) * d)))
            w[q + kv:].copy_(reader.read(name, rows=(base + (g + 1) * d, base + (g + 2) * d)))

    def _load_split(self, reader: CheckpointReader, q_name: str, k_name: str, v_name: str) -> None:
        """From the Llama layout's separate q_proj / k_proj / v_proj (same head order)."""
        d, q, kv = self.head_dim, self.q_size, self.kv_size
        reader.expect_shape(q_name, (self.heads * d, self.hidden))
        reader.expect_shape(k_name, (self.kv_heads * d, self.hidden))
        reader.expect_shape(v_name, (self.kv_heads * d, self.hidden))
        w = self.weight.data
        w[:q].copy_(reader.read(q_name, rows=(self.q0 * d, self.q0 * d + q)))
        w[q:q + kv].copy_(reader.read(k_name, rows=(self.kv0 * d, self.kv0 * d + kv)))
        w[q + kv:].copy_(reader.read(v_name, rows=(self.kv0 * d, self.kv0 * d + kv)))


class VocabParallelEmbedding(ShardedLinear):
    """Rows of the vocab split over ranks (padded to a multiple of tp with zero rows).
    forward() returns this rank's PARTIAL embedding (zeros for ids it does not own): the
    caller all-reduces.

    When the run's dtype is wider than the checkpoint's (fp32 on a CPU without bf16 for a bf16
    checkpoint), the table stays in the checkpoint's dtype and only the looked-up rows are
    widened: exact, as every bf16/fp16 value is an fp32 value, and it halves the largest tensor
    (92544 x 6144 x 2 B saved per 20B rank) and its load time."""

    keep_checkpoint_dtype = True
    packable = False   # a lookup table, not a matmul

    def __init__(self, vocab: int, hidden: int, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device):
        self.vocab, self.hidden, self.tp = vocab, hidden, tp
        self.per_rank = -(-vocab // tp.size)
        self.start = tp.rank * self.per_rank
        self.end = min(self.start + self.per_rank, vocab)  # rows past `end` are padding
        self.out_dtype = dtype
        super().__init__(self.per_rank, hidden, dtype, device)

    def load(self, reader: CheckpointReader, names: tuple[str, ...]) -> None:
        (name,) = names
        reader.expect_shape(name, (self.vocab, self.hidden))
        stored = reader.dtype(name)
        if (self.keep_checkpoint_dtype and stored in (torch.bfloat16, torch.float16)
                and self.out_dtype == torch.float32):
            self.weight.data = self.weight.data.new_empty(self.weight.shape, dtype=stored)
        w = self.weight.data
        n = max(0, self.end - self.start)
        if n:
            w[:n].copy_(reader.read(name, rows=(self.start, self.end)))
        w[n:].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden] out_dtype
        if self.tp.size == 1:
            return F.embedding(ids, self.weight).to(self.out_dtype)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).to(self.out_dtype)
        return out.masked_fill_(outside.unsqueeze(-1), 0)


class ParallelLMHead(VocabParallelEmbedding):
    """The output head, column-parallel over the vocab. forward() gives this rank's logits
    shard [B, per_rank] (the op set's lm_head: on CPU in bf16 a column-major view);
    `gather()` is the explicit all-gather to full-vocab fp32 logits."""

    keep_checkpoint_dtype = False   # a matmul weight: kept in the run's dtype
    packable = True

    def __init__(self, vocab: int, hidden: int, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device, ops: Any = CPU_OPS):
        super().__init__(vocab, hidden, tp, dtype, device)
        self.ops = ops
        self.workspace = HeadWorkspace()   # forward()'s result is valid until the next forward

    def packs(self, ops: Any, weight: torch.Tensor) -> bool:
        return ops.packs_head_weight(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, per_rank]
        return self.ops.lm_head(x, self.weight, self.packed, self.workspace)

    def gather(self, local_logits: torch.Tensor) -> torch.Tensor:  # -> [B, vocab] float32
        local = local_logits.to(torch.float32, memory_format=torch.contiguous_format)
        full = self.tp.all_gather_last(local)
        return full[:, : self.vocab]

    def argmax(self, local_logits: torch.Tensor, row_max: RowMax | None = None
               ) -> torch.Tensor:  # [B, per_rank] -> [B] int64
        """The full-vocab argmax (first occurrence, as torch.argmax of gather()) without
        gathering the vocab: each rank's best (value, global id), then an all-gather of 2 numbers
        per row instead of per_rank (256 rows x 92544 x 4 B = 95 MB per step at any tp).
        The max runs on the logits' own dtype: widening bf16 to fp32 is exact, so the winner
        is the same, without a [B, per_rank] fp32 copy. `row_max` is the op set's (max, first
        index) per row; None: torch's max(dim=-1)."""
        real = max(0, self.end - self.start)          # vocab padding never wins
        if real == 0:                                 # a rank of padding only
            vals = local_logits.new_full(local_logits.shape[:1], float("-inf"))
            idx = torch.zeros(local_logits.shape[0], dtype=torch.long, device=vals.device)
        else:
            local = local_logits if real == self.per_rank else local_logits[:, :real]
            vals, idx = (row_max or _max_last)(local)  # first occurrence inside the shard
        if self.tp.size == 1:
            return idx
        best = torch.stack([vals.double(), (idx + self.start).double()], dim=-1)  # [B, 2]
        every = self.tp.all_gather_last(best).view(-1, self.tp.size, 2)         # [B, tp, 2]
        # The lowest rank holding the max holds the first occurrence (ranks own ascending ids).
        winner = every[..., 0].argmax(dim=-1, keepdim=True)                      # [B, 1]
        return every[..., 1].gather(1, winner).squeeze(1).long()
