"""The plain attention backend (CPU, CUDA, and the NPU backend's fallback): torch ops over the
paged KV cache [num_blocks, block_size, kv_heads, head_dim], with a bounded working set.

    backend.prepare(meta, cache, num_heads)      # once per step: host-side plan in meta.plan
    out = backend.forward(q, k, v, kv, meta, scale)   # per layer: q [T, H, d] -> [T, H*d]

Peak extra memory: a step's work is cut into pieces whose gathered keys/values (and their fp32
copies) stay under budget = max(MIN_CHUNK_BYTES, CHUNK_FRACTION x the step's KV bytes in one
layer); pieces run one after another. Decode rows go in row chunks: each chunk's blocks are
gathered whole (one index_select of contiguous blocks) and the chunk runs one fused SDPA call
with a row's query heads of one KV group as its query length (no GQA expansion) and a padding
mask; both the block ids and the mask are built once per step in prepare(), not per layer. A
row whose context alone exceeds the budget is read in key chunks with an online softmax.

Prefill: fresh prompts are grouped under the same budget and run SDPA with is_causal and
enable_gqa (no mask, so the fused kernels take it). A sequence continuing cached keys (every
chunk of a long prompt after its first, prefix-cache hits) runs alone and builds no mask: its
n new queries attend causally to their own n keys (taken from this step's k/v, not the cache)
and, without a mask, to the cached prefix read in tiles of at most budget bytes; the pieces,
each from a fused kernel that returns its log-sum-exp (lse.py), merge exactly. Its extra memory
is one tile's keys/values (<= budget) plus about 4 x n x H x d x 4 bytes (the folded query,
the tile's output, the fp32 accumulator and a merge temporary), whatever the prefix length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from internlm2_tp.attention.lse import attend, merge
from internlm2_tp.attention.metadata import AttentionMetadata, ToDevice, plain_to_device

MIN_CHUNK_BYTES = 32 << 20
CHUNK_FRACTION = 1 / 20


@dataclass
class DecodeChunk:
    r0: int               # decode rows [r0, r1)
    r1: int
    keys: int             # the longest context among them
    step: int             # keys read per pass (== keys unless split)
    blocks: torch.Tensor | None = None   # [rows * blocks] cache blocks to gather (unsplit)
    mask: torch.Tensor | None = None     # [rows, 1, 1, keys] True where a key is the row's


@dataclass
class PrefillGroup:
    """Fresh prompts (no cached keys: query i sees keys <= i), run together."""
    s0: int               # sequences [s0, s1) of the step, tokens [t0, t1) of T
    s1: int
    t0: int
    t1: int
    q: int                # longest query, longest context in the group
    k: int
    tok_seq: torch.Tensor | None = None   # [t1 - t0] group row of each token (None: one row)
    tok_pos: torch.Tensor | None = None   # [t1 - t0] its position among the row's queries


@dataclass
class Continuation:
    """One sequence whose t1 - t0 new tokens (tokens [t0, t1) of T) follow `cached` keys."""
    s: int
    t0: int
    t1: int
    cached: int
    tile: int             # cached keys per kernel call: a multiple of the block size


@dataclass
class TorchPlan:
    decode: list[DecodeChunk] = field(default_factory=list)
    prefill: list[PrefillGroup] = field(default_factory=list)
    cont: list[Continuation] = field(default_factory=list)
    kernel: bool = False  # decode rows go through the CPU kernel (no chunks)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store this step's keys/values [T, KVH, d] at their flat slots."""
    kv_heads, d = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, d).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, d).index_copy_(0, slots, v)


def gather_kv(cache: torch.Tensor, tables: torch.Tensor, first: int, n: int) -> torch.Tensor:
    """[B, KVH, n, d]: keys (or values) [first, first + n) of each sequence; `first` is a
    multiple of the block size."""
    bs = cache.shape[1]
    b0 = first // bs
    return gather_blocks(cache, tables[:, b0:b0 + -(-n // bs)].reshape(-1), tables.shape[0], n)


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """[rows, KVH, n, d] (a view): the first n keys of `rows` runs of whole blocks (an
    index_select of contiguous blocks, several times faster than advanced indexing)."""
    kv_heads, d = cache.shape[2:]
    return cache.index_select(0, blocks).view(rows, -1, kv_heads, d)[:, :n].transpose(1, 2)


class TorchAttention:
    name = "torch"

    def __init__(self, to_device: ToDevice = plain_to_device,
                 min_chunk_bytes: int = MIN_CHUNK_BYTES, chunk_fraction: float = CHUNK_FRACTION,
                 decode_kernel: Any = None):
        self.to_device, self.min_bytes, self.fraction = to_device, min_chunk_bytes, chunk_fraction
        self.kernel = decode_kernel   # cpu_kernel.DecodeKernel: decode rows read in place

    def prepare(self, meta: AttentionMetadata, cache: torch.Tensor, num_heads: int) -> None:
        meta.plan = self.plan(meta, cache, num_heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, scale: float
                ) -> torch.Tensor:
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        nd = meta.num_decodes
        if meta.plan.kernel and not self.kernel.decode(
                q[:nd].contiguous(), kv, meta.block_tables[:nd], meta.context_lens[:nd],
                out[:nd], scale):
            raise RuntimeError("the CPU decode kernel refused shapes it accepted at prepare()")
        self.decode(q, kv, meta, meta.plan, scale, out)
        self.prefill(q, kv, meta, meta.plan, scale, out, k, v)
        return out

    # -- planning (host only) ---------------------------------------------------------------------
    def plan(self, meta: AttentionMetadata, cache: torch.Tensor, num_heads: int) -> TorchPlan:
        _, bs, kvh, d = cache.shape
        its = cache.element_size()
        layer_kv = sum(meta.context_lens_host) * kvh * d * 2 * its
        budget = max(self.min_bytes, int(self.fraction * layer_kv))
        per_key = kvh * d * (2 * its + 2 * 4) + 2 * num_heads * 4   # k, v, fp32 copies, scores
        nd, ctx = meta.num_decodes, meta.context_lens_host
        plan = TorchPlan(kernel=nd > 0 and self.kernel is not None
                         and self.kernel.supports(cache, num_heads))
        r0 = nd if plan.kernel else 0
        while r0 < nd:
            r1, top = r0 + 1, ctx[r0]
            while r1 < nd and (r1 + 1 - r0) * max(top, ctx[r1]) * per_key <= budget:
                top, r1 = max(top, ctx[r1]), r1 + 1
            step = top if (r1 - r0) * top * per_key <= budget else \
                max(bs, budget // per_key // bs * bs)
            plan.decode.append(DecodeChunk(r0, r1, top, step))
            r0 = r1
        self._decode_inputs(meta, plan, bs)
        tile = max(bs, budget // (kvh * d * (2 * its + 2 * 4)) // bs * bs)   # k, v, fp32 copies
        self._plan_prefill(meta, plan, budget, kvh * d * 2 * its, tile, cache.device)
        return plan

    @staticmethod
    def _decode_inputs(meta: AttentionMetadata, plan: TorchPlan, bs: int) -> None:
        """Per unsplit decode chunk, once per step: the blocks to gather and the padding mask
        (device ops on the step's tensors; no host read)."""
        for c in plan.decode:
            if c.step >= c.keys:
                c.blocks = meta.block_tables[c.r0:c.r1, :-(-c.keys // bs)].reshape(-1)
                keys = torch.arange(c.keys, device=meta.context_lens.device)
                c.mask = (keys[None, :] < meta.context_lens[c.r0:c.r1, None])[:, None, None, :]

    def _plan_prefill(self, meta: AttentionMetadata, plan: TorchPlan, budget: int,
                      per_key: int, tile: int, device: torch.device) -> None:
        """Each sequence continuing cached keys alone (its prefix in tiles of `tile` keys);
        runs of fresh prompts in groups under the budget."""
        nd, b = meta.num_decodes, meta.num_seqs
        ql, cl = meta.query_lens_host, meta.context_lens_host
        s0, t0 = nd, sum(ql[:nd])
        while s0 < b:
            if ql[s0] < cl[s0]:
                plan.cont.append(Continuation(s0, t0, t0 + ql[s0], cl[s0] - ql[s0], tile))
                s0, t0 = s0 + 1, t0 + ql[s0]
                continue
            s1, top = s0 + 1, cl[s0]
            while s1 < b and ql[s1] == cl[s1] and \
                    (s1 + 1 - s0) * max(top, cl[s1]) * per_key <= budget:
                top, s1 = max(top, cl[s1]), s1 + 1
            n = sum(ql[s0:s1])
            g = PrefillGroup(s0, s1, t0, t0 + n, max(ql[s0:s1]), top)
            if s1 - s0 > 1:
                seq = [i for i in range(s1 - s0) for _ in range(ql[s0 + i])]
                pos = [p for i in range(s0, s1) for p in range(ql[i])]
                g.tok_seq = self.to_device(torch.tensor(seq, dtype=torch.long), device)
                g.tok_pos = self.to_device(torch.tensor(pos, dtype=torch.long), device)
            plan.prefill.append(g)
            s0, t0 = s1, t0 + n

    # -- decode: one new token per row ------------------------------------------------------------
    def decode(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
               meta: AttentionMetadata, plan: TorchPlan, scale: float, out: torch.Tensor) -> None:
        """Rows [0, num_decodes) of q [T, H, d] -> out rows [T, H*d]. Query heads are grouped
        under their KV head so cached keys are read once per group (fp32 softmax inside SDPA)."""
        for c in plan.decode:
            n, (_, h, d) = c.r1 - c.r0, q.shape
            kvh = kv[0].shape[2]
            qg = q[c.r0:c.r1].reshape(n, kvh, h // kvh, d)                       # [n, KVH, g, d]
            if c.blocks is not None:
                keys = gather_blocks(kv[0], c.blocks, n, c.keys)                 # [n, KVH, K, d]
                vals = gather_blocks(kv[1], c.blocks, n, c.keys)
                o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=c.mask, scale=scale)
            else:
                tables, ctx = meta.block_tables[c.r0:c.r1], meta.context_lens[c.r0:c.r1]
                o = self._decode_split(qg.float(), kv, tables, ctx, c, scale)
            out[c.r0:c.r1] = o.to(q.dtype).reshape(n, h * d)

    @staticmethod
    def _decode_split(qg: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                      tables: torch.Tensor, ctx: torch.Tensor, c: DecodeChunk, scale: float
                      ) -> torch.Tensor:
        """Online softmax over key chunks of c.step tokens: [n, KVH, g, d] fp32."""
        top = torch.full(qg.shape[:-1] + (1,), float("-inf"), device=qg.device)
        total = torch.zeros_like(top)
        acc = torch.zeros_like(qg)
        for j0 in range(0, c.keys, c.step):
            n_keys = min(c.step, c.keys - j0)
            keys = gather_kv(kv[0], tables, j0, n_keys).float()
            s = torch.matmul(qg, keys.transpose(-1, -2)) * scale                # [n, KVH, g, k]
            valid = j0 + torch.arange(n_keys, device=qg.device)[None, :] < ctx[:, None]
            s.masked_fill_(~valid[:, None, None, :], float("-inf"))
            new_top = torch.maximum(top, s.amax(-1, keepdim=True))  # finite: key 0 is valid
            p, fix = torch.exp(s - new_top), torch.exp(top - new_top)
            total = total * fix + p.sum(-1, keepdim=True)
            acc = acc * fix + torch.matmul(p, gather_kv(kv[1], tables, j0, n_keys).float())
            top = new_top
        return acc / total

    # -- prefill: several new tokens per sequence -------------------------------------------------
    def prefill(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, plan: TorchPlan, scale: float, out: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens of the prefilling sequences -> their out rows: fresh groups, then each
        continuation. k/v [T, KVH, d] are this step's keys/values (already in the cache)."""
        h, hd = q.shape[1:]
        for g in plan.prefill:
            b = g.s1 - g.s0
            tables = meta.block_tables[g.s0:g.s1]
            if g.tok_seq is None:
                qp = q[g.t0:g.t1].unsqueeze(0)                                   # [1, Q, H, d]
            else:
                qp = q.new_zeros(b, g.q, h, hd)
                qp[g.tok_seq, g.tok_pos] = q[g.t0:g.t1]
            keys = gather_kv(kv[0], tables, 0, g.k)                              # [B, KVH, K, d]
            values = gather_kv(kv[1], tables, 0, g.k)
            o = F.scaled_dot_product_attention(qp.transpose(1, 2), keys, values, is_causal=True,
                                               scale=scale, enable_gqa=True).transpose(1, 2)
            o = o[0] if g.tok_seq is None else o[g.tok_seq, g.tok_pos]           # [B, Q, H, d]
            out[g.t0:g.t1] = o.reshape(g.t1 - g.t0, h * hd)
        for c in plan.cont:
            out[c.t0:c.t1] = self._continue(q[c.t0:c.t1], k[c.t0:c.t1], v[c.t0:c.t1], kv,
                                            meta.block_tables[c.s:c.s + 1], c, scale)

    @staticmethod
    def _continue(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kv: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor, c: Continuation,
                  scale: float) -> torch.Tensor:
        """q [n, H, d] after c.cached keys, k/v [n, KVH, d] its own -> [n, H*d]. The new keys
        causally, then each tile of the prefix (all visible: no mask), merged by lse."""
        n, h, d = q.shape
        kvh = k.shape[1]
        acc, total = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                            v.transpose(0, 1)[None], True, scale)     # [1, H, n, d], [1, H, n]
        acc = acc.float()
        # a KV head's g query heads as one query of g*n rows: the prefix needs no GQA repeat
        qf = q.view(n, kvh, h // kvh, d).permute(1, 2, 0, 3).reshape(1, kvh, -1, d)
        for j0 in range(0, c.cached, c.tile):
            m = min(c.tile, c.cached - j0)
            o, lse = attend(qf, gather_kv(kv[0], table, j0, m), gather_kv(kv[1], table, j0, m),
                            False, scale)                            # [1, KVH, g*n, (d)]
            acc, total = merge(acc, total, o.reshape(1, h, n, d), lse.reshape(1, h, n))
        return acc[0].transpose(0, 1).reshape(n, h * d).to(q.dtype)
