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
    logits_indices: torch.Tensor | None  # [B] index into T of each sequence's last token; None: all
    max_query_len: int
    max_context_len: int
    # Derived once per step by prepare(), shared by all layers.
    token_seq: torch.Tensor | None = field(default=None, repr=False)    # [T] sequence of token
    token_qpos: torch.Tensor | None = field(default=None, repr=False)   # [T] index within seq
    mask: torch.Tensor | None = field(default=None, repr=False)         # [B, 1, Q, K] bool

    @property
    def num_seqs(self) -> int:
        return int(self.block_tables.shape[0])

    def prepare(self) -> "AttentionMetadata":
        if self.token_seq is not None:
            return self
        dev = self.positions.device
        b, q, k = self.num_seqs, self.max_query_len, self.max_context_len
        self.token_seq = torch.repeat_interleave(torch.arange(b, device=dev), self.query_lens)
        starts = torch.cumsum(self.query_lens, 0) - self.query_lens                    # [B]
        self.token_qpos = torch.arange(self.positions.numel(), device=dev) - starts[self.token_seq]
        if q == 1:
            # decode-only step: every query sees keys [0, context_len)
            self.mask = (torch.arange(k, device=dev)[None, :] < self.context_lens[:, None])
            self.mask = self.mask[:, None, None, :]
            return self
        qi = torch.arange(q, device=dev)[None, :, None]                                  # [1, Q, 1]
        kj = torch.arange(k, device=dev)[None, None, :]                                  # [1, 1, K]
        first = (self.context_lens - self.query_lens)[:, None, None]                     # [B, 1, 1]
        mask = (kj <= first + qi) & (kj < self.context_lens[:, None, None])
        # Padded query rows would see no key and give NaN: let them see key 0 (discarded).
        pad_q = qi >= self.query_lens[:, None, None]
        self.mask = (mask | (pad_q & (kj == 0)))[:, None]                                 # [B,1,Q,K]
        return self


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Store this step's keys/values. Caches: [num_blocks, block_size, kv_heads, head_dim]."""
    kv_heads, d = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, d).index_copy_(0, slots, k)
    v_cache.view(-1, kv_heads, d).index_copy_(0, slots, v)


def gather_kv(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[B, kv_heads, K, head_dim]: each sequence's first K cached keys (or values)."""
    b, nb = meta.block_tables.shape
    bs, kv_heads, d = cache.shape[1:]
    flat = cache[meta.block_tables].view(b, nb * bs, kv_heads, d)[:, : meta.max_context_len]
    return flat.transpose(1, 2)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, d], k/v [T, KVH, d] for this step's tokens -> [T, H*d]."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    meta.prepare()
    t, h, d = q.shape
    b, qn = meta.num_seqs, meta.max_query_len
    if qn == 1:
        qp = q.view(b, 1, h, d)
    else:
        qp = q.new_zeros(b, qn, h, d)
        qp[meta.token_seq, meta.token_qpos] = q
    keys, values = gather_kv(k_cache, meta), gather_kv(v_cache, meta)   # [B, KVH, K, d]
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys, values, attn_mask=meta.mask,
                                         scale=scale, enable_gqa=True)   # [B, H, Q, d]
    out = out.transpose(1, 2)                                            # [B, Q, H, d]
    if qn == 1:
        return out.reshape(t, h * d)
    return out[meta.token_seq, meta.token_qpos].reshape(t, h * d)


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
        logits_indices=None if all_logits else last.to(device),
        max_query_len=max(lengths), max_context_len=max(lengths))
