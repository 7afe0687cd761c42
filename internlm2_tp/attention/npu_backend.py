"""Ascend attention: torch_npu.npu_fused_infer_attention_score (FIA) over our paged KV cache.

FIA is documented for the Atlas A2 training series, the Atlas 800I A2 inference servers and
A3 (Ascend/op-plugin docs/context/torch_npu-npu_fused_infer_attention_score.md, "FIA doc"
below); npu_fusion_attention, used before, documents the training series only. One kernel
serves both phases: a query of S = 1 takes its incremental branch, S > 1 its prompt branch.

- Cache: ours, [num_blocks, block_size, KVH, d], viewed for free as (blocknum, blocksize,
  H = KVH*d), the page-attention layout FIA takes with a BSH query.
- Decodes: query BSH [nd, 1, H*d]; block_table int32 [nd, >= blocks of the longest row];
  actual_seq_lengths_kv a host list (keys per row); block_size a multiple of 16, non-zero and
  at most 512 (stated from op-plugin 7.2.0; held for every version). At most S = 262144 keys
  per row: a longer row is read in key ranges of at most that many, one call each with
  softmax_lse_flag=True (the page's softmaxLse, (B, N, 1, 1) fp32), merged exactly by
  log-sum-exp (attention/lse.py).
- Prefills: query BSH [b, Q, H*d], rows padded to the longest; actual_seq_lengths (new tokens)
  and actual_seq_lengths_kv (visible keys) host lists per row; sparse_mode=3 (rightDownCausal:
  query i of a row with n new and c visible keys sees keys <= c - n + i) with the 2048 x 2048
  mask, 1 = masked above the diagonal; block_size a multiple of 128 in [128, 512]; d % 16 == 0.
- Both: fp16/bf16; N <= 256; N/KVH an integer <= 64; d <= 512; N*d < 65535 (a BSH query's H);
  KVH*d <= 65535; each cache
  under 2^31 elements; B <= 65536; the cache holds at least the sum of the call's rows'
  blocks, which shared prefix blocks can break, so rows are split into calls that keep it.
A phase outside these runs the plain path (TorchAttention) for that step, with one warning per
reason (an engine.block_size of 1024 takes the plain path for decodes, with one warning, rather
than being refused: prefill has the same plain path). The decision depends
only on the step's host-side shapes and the config, so it is the same on every rank; prepare()
builds everything from host lists, so no step reads a device value back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from internlm2_tp.attention.lse import merge
from internlm2_tp.attention.metadata import AttentionMetadata, ToDevice, plain_to_device
from internlm2_tp.attention.torch_backend import TorchAttention, TorchPlan, write_kv

log = logging.getLogger(__name__)
MASK_SIZE = 2048          # sparse_mode 2/3/4 take this compressed mask (FIA doc)
PAD_TOKENS = 2048         # a prefill call pads at most max(this, 2 x its tokens) query rows
DECODE_MAX_KEYS = 262144  # FIA doc, query S = 1: S (keys per row) <= 262144
DECODE_MAX_BLOCK = 512    # FIA doc, query S = 1 with page attention: block_size <= 512 (7.2.0)
BSH_MAX_H = 65535         # FIA doc: a BSH query's N * D < 65535


@dataclass
class Call:
    s0: int                       # rows [s0, s1) of the step, tokens [t0, t1) of T
    s1: int
    t0: int
    t1: int
    q: int                        # longest query among the rows
    dest: torch.Tensor | None = None   # [t1 - t0] flat row*q + pos of each token (None: 1 row)


@dataclass
class SplitRow:
    """A decode row with more keys than one call takes: key ranges [j0, j0 + m), one call each."""
    r: int
    lens: list[int]                           # m of each range
    tables: list[torch.Tensor]                # [1, ceil(m / block_size)] int32 of each range


@dataclass
class NpuPlan:
    tables: torch.Tensor                      # [B, max_blocks] int32
    decode: list[Call] | None                 # None: the plain path takes the decodes
    prefill: list[Call] | None
    split: list[SplitRow] = field(default_factory=list)   # decode rows over DECODE_MAX_KEYS
    fallback: TorchPlan | None = None
    why: list[str] = field(default_factory=list)


def unsupported(phase: str, dtype: torch.dtype, heads: int, cache: torch.Tensor,
                rows: int) -> str | None:
    """Why FIA cannot take this phase of the step (None: it can)."""
    _, bs, kvh, d = cache.shape
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (FIA takes float16 / bfloat16)"
    if heads > 256 or heads % kvh or heads // kvh > 64 or d > 512 or kvh * d > 65535 \
            or heads * d >= BSH_MAX_H:
        return f"{heads} heads over {kvh} KV heads of dim {d}"
    if cache.numel() >= 2**31 or rows > 65536:
        return "a cache of 2^31 elements or a batch over 65536 rows"
    if phase == "decode" and (bs % 16 or not 0 < bs <= DECODE_MAX_BLOCK):
        return f"block_size {bs} (decode: a multiple of 16 up to {DECODE_MAX_BLOCK})"
    if phase == "prefill" and (bs % 128 or not 128 <= bs <= 512 or d % 16):
        return f"block_size {bs}, head_dim {d} (prefill: block 128..512 by 128, d % 16 == 0)"
    return None


class NpuAttention:
    name = "npu"

    def __init__(self, torch_npu: Any, to_device: ToDevice = plain_to_device,
                 decode_max_keys: int = DECODE_MAX_KEYS):
        self.npu, self.to_device, self.max_keys = torch_npu, to_device, decode_max_keys
        self.fallback = TorchAttention(to_device)
        self._masks: dict[torch.device, torch.Tensor] = {}
        self._warned: set[str] = set()

    # -- planning (host only) ---------------------------------------------------------------------
    def prepare(self, meta: AttentionMetadata, cache: torch.Tensor, num_heads: int) -> None:
        nd, b, bs = meta.num_decodes, meta.num_seqs, cache.shape[1]
        blocks = [-(-c // bs) for c in meta.context_lens_host]
        plan = NpuPlan(meta.block_tables.to(torch.int32), None, None)
        for phase, lo, hi in (("decode", 0, nd), ("prefill", nd, b)):
            if lo == hi:
                continue
            why = unsupported(phase, cache.dtype, num_heads, cache, hi - lo)
            if why is not None:
                plan.why.append(f"{phase}: {why}")
                continue
            if phase == "decode":
                plan.decode = self._decode_calls(meta, plan, blocks, cache)
            else:
                plan.prefill = self._calls(meta, lo, hi, blocks, cache.shape[0], cache.device)
        if plan.why:
            plan.fallback = self.fallback.plan(meta, cache, num_heads)
            for w in plan.why:
                if w not in self._warned:
                    self._warned.add(w)
                    log.warning("NPU attention runs the plain path for %s", w)
        meta.plan = plan

    def _calls(self, meta: AttentionMetadata, lo: int, hi: int, blocks: list[int],
               num_blocks: int, device: torch.device) -> list[Call]:
        """Rows [lo, hi) cut into kernel calls: each call's rows need at most num_blocks blocks
        (FIA doc, page attention) and pad at most max(PAD_TOKENS, 2 x tokens) query rows."""
        ql = meta.query_lens_host
        calls, s0, t0 = [], lo, sum(ql[:lo])
        while s0 < hi:
            s1, used, top, n = s0 + 1, blocks[s0], ql[s0], ql[s0]
            while s1 < hi and used + blocks[s1] <= num_blocks and \
                    (s1 + 1 - s0) * max(top, ql[s1]) <= max(PAD_TOKENS, 2 * (n + ql[s1])):
                used, top, n, s1 = used + blocks[s1], max(top, ql[s1]), n + ql[s1], s1 + 1
            call = Call(s0, s1, t0, t0 + n, top)
            if top > 1 and s1 - s0 > 1:
                dest = [(i - s0) * top + p for i in range(s0, s1) for p in range(ql[i])]
                call.dest = self.to_device(torch.tensor(dest, dtype=torch.long), device)
            calls.append(call)
            s0, t0 = s1, t0 + n
        return calls

    def _decode_calls(self, meta: AttentionMetadata, plan: NpuPlan, blocks: list[int],
                      cache: torch.Tensor) -> list[Call]:
        """Runs of decode rows within the key limit as calls; each longer row as a SplitRow."""
        ctx, bs = meta.context_lens_host, cache.shape[1]
        step = max(bs, self.max_keys // bs * bs)   # whole blocks; bs <= 512 < the real limit
        calls, r = [], 0
        while r < meta.num_decodes:
            if ctx[r] > self.max_keys:
                starts = range(0, ctx[r], step)
                plan.split.append(SplitRow(r, [min(step, ctx[r] - j0) for j0 in starts], [
                    plan.tables[r:r + 1, j0 // bs:-(-min(ctx[r], j0 + step) // bs)].contiguous()
                    for j0 in starts]))
                r += 1
                continue
            e = r + 1
            while e < meta.num_decodes and ctx[e] <= self.max_keys:
                e += 1
            calls += self._calls(meta, r, e, blocks, cache.shape[0], cache.device)
            r = e
        return calls

    def causal_mask(self, device: torch.device) -> torch.Tensor:
        """The compressed mask sparse_mode=3 takes: True (masked) above the diagonal."""
        m = self._masks.get(device)
        if m is None:
            m = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool, device=device).triu(1)
            self._masks[device] = m
        return m

    # -- the step ---------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, scale: float
                ) -> torch.Tensor:
        """q [T, H, d], k/v [T, KVH, d] -> [T, H*d]; this step's k/v go into the caches first."""
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        p: NpuPlan = meta.plan
        t, h, d = q.shape
        out = q.new_empty(t, h * d)
        if p.decode is not None:
            for c in p.decode:
                out[c.t0:c.t1] = self._call(q, kv, meta, p, c, 1, scale)
            for row in p.split:
                out[row.r] = self._split_decode(q[row.r:row.r + 1], kv, row, scale)
        elif meta.num_decodes:
            self.fallback.decode(q, kv, meta, p.fallback, scale, out)
        if p.prefill is not None:
            for c in p.prefill:
                out[c.t0:c.t1] = self._call(q, kv, meta, p, c, c.q, scale)
        elif meta.num_decodes < meta.num_seqs:
            self.fallback.prefill(q, kv, meta, p.fallback, scale, out, k, v)
        return out

    def _call(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
              meta: AttentionMetadata, p: NpuPlan, c: Call, s: int, scale: float
              ) -> torch.Tensor:
        """One FIA call for rows [c.s0, c.s1), query length s (1: decode) -> [t1 - t0, H*d]."""
        h, d = q.shape[1:]
        nb, bs, kvh, _ = kv[0].shape
        b, n = c.s1 - c.s0, c.t1 - c.t0
        rows = q[c.t0:c.t1].reshape(n, h * d)
        if c.dest is None:
            query = rows.view(b, s, h * d)                                       # [B, S, H*d]
        else:
            query = q.new_zeros(b * s, h * d)
            query[c.dest] = rows
            query = query.view(b, s, h * d)
        kw: dict[str, Any] = {}
        if s > 1:
            kw = dict(atten_mask=self.causal_mask(q.device), sparse_mode=3,
                      actual_seq_lengths=meta.query_lens_host[c.s0:c.s1])
        o, _ = self.npu.npu_fused_infer_attention_score(
            query, kv[0].view(nb, bs, kvh * d), kv[1].view(nb, bs, kvh * d),
            actual_seq_lengths_kv=meta.context_lens_host[c.s0:c.s1],
            block_table=p.tables[c.s0:c.s1], num_heads=h, num_key_value_heads=kvh, scale=scale,
            input_layout="BSH", block_size=bs, **kw)
        o = o.view(b * s, h * d)
        return o if c.dest is None else o[c.dest]

    def _split_decode(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                      row: SplitRow, scale: float) -> torch.Tensor:
        """q [1, H, d] of one decode row -> [H*d]: one call per key range, each returning its
        softmax LSE [1, N, 1, 1], merged in fp32."""
        h, d = q.shape[1:]
        nb, bs, kvh, _ = kv[0].shape
        acc = total = None
        for m, table in zip(row.lens, row.tables):
            o, lse = self.npu.npu_fused_infer_attention_score(
                q.reshape(1, 1, h * d), kv[0].view(nb, bs, kvh * d), kv[1].view(nb, bs, kvh * d),
                actual_seq_lengths_kv=[m], block_table=table, num_heads=h,
                num_key_value_heads=kvh, scale=scale, input_layout="BSH", block_size=bs,
                softmax_lse_flag=True)
            o, lse = o.view(h, d).float(), lse.view(h)
            acc, total = (o, lse) if acc is None else merge(acc, total, o, lse)
        return acc.reshape(h * d).to(q.dtype)
