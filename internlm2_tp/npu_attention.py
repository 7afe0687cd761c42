"""Ascend attention over our paged KV cache: torch_npu's fused kernels behind one call.

    out = npu_paged_attention(q, k, v, k_cache, v_cache, meta, scale, torch_npu)  # [T, H*d] | None

The caller has already written this step's k/v into the caches (attention.write_kv); None means
"this step's shapes are outside what the kernels document" and the caller runs the plain path.
The decision depends only on the step (dtype, head counts, block size, batch sizes), so every
layer of a step takes the same path. Tokens are ordered as AttentionMetadata orders them: the
`num_decodes` one-token sequences first, then the prefilling ones.

- Decodes: torch_npu.npu_incre_flash_attention in page-attention mode: query BSH [B, 1, H*d],
  block_table int32 [B, max_blocks], actual_seq_lengths (host list: keys per sequence),
  num_heads, num_key_value_heads (GQA), block_size, scale_value. Its documented cache layouts
  are (num_blocks, block_size, KVH*d) with a BSH query, or (num_blocks, KVH, block_size, d) with
  a BNSD query. Ours, [num_blocks, block_size, KVH, d], is the first one after a free .view():
  no copy, no cache re-layout. (The second is documented as faster; it would need
  allocate_kv_caches/write_kv to store heads before tokens; not done.) Constraints honoured
  below: fp16/bf16, block_size a multiple of 16, H/KVH <= 64, H <= 256, d <= 512.
- Prefills (whole prompts, chunks, prefix-cache hits): torch_npu.npu_fusion_attention in the
  varlen TND layout: q [Tq, H, d], k/v [Tk, KVH, d] packed per sequence, actual_seq_qlen /
  actual_seq_kvlen cumulative host lists, sparse_mode=3 (rightDownCausal: query i of a sequence
  with n new and c visible keys sees keys <= c - n + i, our causal rule with a cached prefix)
  with the 2048 x 2048 upper-triangular bool mask that mode takes (1 = masked). When no
  sequence has cached keys, this step's k/v are passed as they are; otherwise each sequence's
  keys are gathered from the cache through its block table (one index_select).
  Constraints honoured: fp16/bf16, <= 1024 sequences, H <= 256, d <= 768, T <= 1M.

Per-step host data (lengths as lists, int32 tables, gather indices) is derived once, on the
first layer, and reused by the others (one device->host sync per step, not per layer).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from internlm2_tp.attention import AttentionMetadata

DTYPES = (torch.float16, torch.bfloat16)
MAX_VARLEN_SEQS = 1024        # npu_fusion_attention: actual_seq_qlen length in varlen mode
MAX_TOKENS = 1 << 20          # npu_fusion_attention: T in varlen mode
MAX_DECODE_BATCH = 65535      # npu_incre_flash_attention on Atlas A2
MAX_GQA_RATIO = 64            # npu_incre_flash_attention: num_heads / num_key_value_heads
MAX_HEADS = 256
CAUSAL_MASK_SIZE = 2048       # sparse_mode 2/3/4 take a compressed 2048 x 2048 mask


@dataclass
class StepPlan:
    """What the kernels need for one step, shared by all layers."""
    num_decodes: int
    dec_lens: list[int]                      # keys per decode sequence
    dec_tables: torch.Tensor | None          # [nd, max_blocks] int32
    pre_qlen_cum: list[int]                  # cumulative new tokens per prefill sequence
    pre_kvlen_cum: list[int]                 # cumulative visible keys per prefill sequence
    pre_gather: torch.Tensor | None          # [sum keys] flat cache slots; None: use k/v as is


_last: tuple[weakref.ReferenceType, StepPlan] | None = None
_masks: dict[torch.device, torch.Tensor] = {}


def unsupported_reason(q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata) -> str | None:
    """Why the fused kernels cannot take this step (None: they can)."""
    t, h, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    nd, b = meta.num_decodes, meta.num_seqs
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the kernels take float16 / bfloat16)"
    if h > MAX_HEADS or h % kvh:
        return f"{h} query heads over {kvh} KV heads"
    if nd and (bs % 16 or d > 512 or h // kvh > MAX_GQA_RATIO or nd > MAX_DECODE_BATCH):
        return f"paged decode needs block_size % 16 == 0, head_dim <= 512, H/KVH <= 64 (got " \
               f"block {bs}, d {d}, {h}/{kvh}, {nd} sequences)"
    if b > nd and (b - nd > MAX_VARLEN_SEQS or d > 768 or t > MAX_TOKENS):
        return f"varlen prefill takes <= {MAX_VARLEN_SEQS} sequences, head_dim <= 768"
    return None


def causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed mask sparse_mode=3 expects: True (masked) above the diagonal."""
    m = _masks.get(device)
    if m is None:
        m = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device).triu(1)
        _masks[device] = m
    return m


def _cumsum(xs: list[int]) -> list[int]:
    out, s = [], 0
    for x in xs:
        s += x
        out.append(s)
    return out


def build_step_plan(meta: AttentionMetadata, block_size: int) -> StepPlan:
    nd = meta.num_decodes
    qlens, ctx = torch.stack([meta.query_lens, meta.context_lens]).tolist()   # the one sync
    tables = meta.block_tables
    dec_tables = None
    if nd:
        width = -(-max(ctx[:nd]) // block_size)
        dec_tables = tables[:nd, :width].to(torch.int32).contiguous()
    pq, pc = qlens[nd:], ctx[nd:]
    gather = None
    if pq != pc:  # some prefill sequence has cached keys: read all its keys from the cache
        dev = tables.device
        cl = torch.tensor(pc, dtype=torch.long, device=dev)
        seq = torch.repeat_interleave(torch.arange(len(pc), device=dev), cl)
        starts = torch.cumsum(cl, 0) - cl
        pos = torch.arange(sum(pc), device=dev) - starts[seq]
        gather = tables[nd:][seq, pos // block_size] * block_size + pos % block_size
    return StepPlan(nd, ctx[:nd], dec_tables, _cumsum(pq), _cumsum(pc), gather)


def step_plan(meta: AttentionMetadata, block_size: int) -> StepPlan:
    """The step's plan, built on the first layer's call and reused by the rest."""
    global _last
    if _last is not None and _last[0]() is meta:
        return _last[1]
    p = build_step_plan(meta, block_size)
    _last = (weakref.ref(meta), p)
    return p


def npu_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: StepPlan,
               scale: float, torch_npu: Any) -> torch.Tensor:
    """q [nd, H, d] (one new token each) -> [nd, H*d], keys read through the block table."""
    nd, h, d = q.shape
    nb, bs, kvh, _ = k_cache.shape
    out = torch_npu.npu_incre_flash_attention(
        q.reshape(nd, 1, h * d), k_cache.view(nb, bs, kvh * d), v_cache.view(nb, bs, kvh * d),
        actual_seq_lengths=p.dec_lens, block_table=p.dec_tables, num_heads=h,
        num_key_value_heads=kvh, scale_value=scale, input_layout="BSH", block_size=bs)
    return out.reshape(nd, h * d)


def npu_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, p: StepPlan, scale: float, torch_npu: Any) -> torch.Tensor:
    """q [Tq, H, d], this step's k/v [Tq, KVH, d] -> [Tq, H*d], causal over cached + new keys."""
    t, h, d = q.shape
    if p.pre_gather is not None:
        kvh = k_cache.shape[2]
        k = k_cache.view(-1, kvh, d).index_select(0, p.pre_gather)
        v = v_cache.view(-1, kvh, d).index_select(0, p.pre_gather)
    out = torch_npu.npu_fusion_attention(
        q.contiguous(), k.contiguous(), v.contiguous(), h, "TND",
        atten_mask=causal_mask(q.device), scale=scale, sparse_mode=3,
        actual_seq_qlen=p.pre_qlen_cum, actual_seq_kvlen=p.pre_kvlen_cum)[0]
    return out.reshape(t, h * d)


def npu_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float, torch_npu: Any) -> torch.Tensor | None:
    """q [T, H, d], k/v [T, KVH, d] (already in the caches) -> [T, H*d]; None: use the plain
    path for this step. Caches: [num_blocks, block_size, KVH, d] (attention.py's layout)."""
    if unsupported_reason(q, k_cache, meta) is not None:
        return None
    p = step_plan(meta, k_cache.shape[1])
    nd = p.num_decodes
    parts = []
    if nd:
        parts.append(npu_decode(q[:nd], k_cache, v_cache, p, scale, torch_npu))
    if nd < meta.num_seqs:
        parts.append(npu_prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, p, scale, torch_npu))
    return parts[0] if len(parts) == 1 else torch.cat(parts)
