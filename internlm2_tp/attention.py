"""Attention over a paged KV cache, with its metadata passed explicitly.

The engine flattens every scheduled token of every sequence into one list of T tokens (prefill
chunks and decode tokens mixed). AttentionMetadata says, per token, its position, the length used
for dynamic NTK, and its cache slot; per sequence, its block table and lengths.
The plain path (CPU, CUDA, and the NPU fallback) gathers each sequence's cached keys into a
padded batch and runs one SDPA call with a causal+length mask: no per-sequence Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    positions: torch.Tensor       # [T] int64 absolute position of each token
    rope_lengths: torch.Tensor    # [T] int64 the length T dynamic NTK uses for the token
    slot_mapping: torch.Tensor    # [T] int64 flat cache slot (block * block_size + offset)
    block_tables: torch.Tensor    # [B, max_blocks] int64, padded with 0
    context_lens: torch.Tensor    # [B] int64 keys visible after this step (cached + new)
    query_lens: torch.Tensor      # [B] int64 new tokens of each sequence in this step
    logits_indices: torch.Tensor | None  # [B'] index into T of the tokens to sample; None: all
    # The first `num_decodes` sequences have exactly one new token (they come first in T);
    # the rest prefill (whole prompts or chunks). Python ints, known to the scheduler.
    num_decodes: int
    max_decode_context: int
    max_prefill_query: int
    max_prefill_context: int
    # Derived once per step by prepare(), shared by all layers.
    derived: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return int(self.block_tables.shape[0])

    def prepare(self) -> dict:
        d = self.derived
        if d:
            return d
        dev, nd = self.positions.device, self.num_decodes
        if nd:
            kd = self.max_decode_context
            d["dec_valid"] = torch.arange(kd, device=dev)[None, :] < self.context_lens[:nd, None]
        if nd < self.num_seqs:
            ql, cl = self.query_lens[nd:], self.context_lens[nd:]
            b = ql.numel()
            q, k = self.max_prefill_query, self.max_prefill_context
            d["tok_seq"] = torch.repeat_interleave(torch.arange(b, device=dev), ql)
            starts = torch.cumsum(ql, 0) - ql
            d["tok_pos"] = torch.arange(int(ql.sum()), device=dev) - starts[d["tok_seq"]]
            qi = torch.arange(q, device=dev)[None, :, None]                          # [1, Q, 1]
            kj = torch.arange(k, device=dev)[None, None, :]                          # [1, 1, K]
            first = (cl - ql)[:, None, None]                                         # [B, 1, 1]
            mask = (kj <= first + qi) & (kj < cl[:, None, None])
            # Padded query rows would see no key and give NaN: let them see key 0 (discarded).
            pad_q = qi >= ql[:, None, None]
            d["pre_mask"] = (mask | (pad_q & (kj == 0)))[:, None]                    # [B,1,Q,K]
        return d


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store this step's keys/values. Caches: [num_blocks, block_size, kv_heads, head_dim]."""
    kv_heads, d = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, d).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, d).index_copy_(0, slots, v)


def gather_kv(cache: torch.Tensor, tables: torch.Tensor, k: int) -> torch.Tensor:
    """[B, kv_heads, k, head_dim]: each sequence's first k cached keys (or values)."""
    b = tables.shape[0]
    nb = -(-k // cache.shape[1])
    bs, kv_heads, d = cache.shape[1:]
    flat = cache[tables[:, :nb]].view(b, nb * bs, kv_heads, d)[:, :k]
    return flat.transpose(1, 2)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     tables: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per sequence: q [B, H, d] -> [B, H*d]. Query heads are grouped under
    their KV head so the cached keys are read once per group, with fp32 scores (on CPU this is
    several times faster than SDPA with a mask for a single query)."""
    b, h, d = q.shape
    kd = valid.shape[1]
    keys = gather_kv(k_cache, tables, kd).float()                       # [B, KVH, K, d]
    values = gather_kv(v_cache, tables, kd).float()
    kvh = keys.shape[1]
    qg = q.float().view(b, kvh, h // kvh, d)                             # [B, KVH, g, d]
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale            # [B, KVH, g, K]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(-1), values)                       # [B, KVH, g, d]
    return out.to(q.dtype).reshape(b, h * d)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Sequences with several new tokens (prompts, chunks, recomputes): q [Tp, H, d] ->
    [Tp, H*d], padded into one batch with a causal + length mask."""
    d = meta.prepare()
    nd = meta.num_decodes
    t, h, hd = q.shape
    b, qn = meta.num_seqs - nd, meta.max_prefill_query
    tables = meta.block_tables[nd:]
    qp = q.new_zeros(b, qn, h, hd)
    qp[d["tok_seq"], d["tok_pos"]] = q
    keys = gather_kv(k_cache, tables, meta.max_prefill_context)          # [B, KVH, K, d]
    values = gather_kv(v_cache, tables, meta.max_prefill_context)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys, values, attn_mask=d["pre_mask"],
                                         scale=scale, enable_gqa=True)   # [B, H, Q, d]
    return out.transpose(1, 2)[d["tok_seq"], d["tok_pos"]].reshape(t, h * hd)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    fused: object | None = None) -> torch.Tensor:
    """q [T, H, d], k/v [T, KVH, d] for this step's tokens -> [T, H*d]. With `fused` (torch_npu)
    the Ascend kernels run the step when its shapes are ones they document; else the plain path."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    if fused is not None:
        from internlm2_tp.npu_attention import npu_paged_attention

        out = npu_paged_attention(q, k, v, k_cache, v_cache, meta, scale, fused)
        if out is not None:
            return out
    d = meta.prepare()
    nd = meta.num_decodes
    parts = []
    if nd:
        parts.append(decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd],
                                      d["dec_valid"], scale))
    if nd < meta.num_seqs:
        parts.append(prefill_attention(q[nd:], k_cache, v_cache, meta, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def dense_metadata(lengths: list[int], block_size: int, device: torch.device,
                   all_logits: bool = False) -> AttentionMetadata:
    """Metadata for a one-shot prefill of whole sequences into a fresh cache laid out
    contiguously (sequence i in blocks after sequence i-1). Used by tests and warm-up."""
    tables, slots, positions, first = [], [], [], 0
    for n in lengths:
        nb = -(-n // block_size)
        tables.append(list(range(first, first + nb)))
        slots.extend(first * block_size + j for j in range(n))
        positions.extend(range(n))
        first += nb
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    lens = torch.tensor(lengths, dtype=torch.long)
    rope_lengths = torch.repeat_interleave(lens, lens)
    last = torch.cumsum(lens, 0) - 1
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        rope_lengths=rope_lengths.to(device), slot_mapping=torch.tensor(slots, device=device),
        block_tables=bt.to(device), context_lens=lens.to(device), query_lens=lens.to(device),
        logits_indices=None if all_logits else last.to(device), num_decodes=0,
        max_decode_context=0, max_prefill_query=max(lengths), max_prefill_context=max(lengths))
