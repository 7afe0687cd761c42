"""A stand-in for torch_npu written from its documentation, to execute the Ascend path on CPU.

    npu = FakeTorchNpu(free_bytes=...)                 # torch_npu's ops and its `npu` runtime
    platform = NpuPlatform(torch_npu=npu, emulate=True)

Each op the project calls first checks the contract its page documents (ranks and layouts,
dtypes, int32 block tables, host lists of ints, per-row lengths, block sizes, head ratios, the
mask convention) and raises NpuContractError, a RuntimeError as the device's aclnn errors are,
naming the argument and citing the page; then it computes the result in plain torch (fp32 math,
cast to the input dtype). Where torch_npu versions differ, the strictest contract holds. What
the project does not use (quantization, other layouts) raises NotImplementedError.

Pages: Ascend/op-plugin, docs/context/torch_npu-<op>.md (branches 7.1.0 to 7.3.0), and the
torch_npu API reference on hiascend.com (PyTorch 6.0 / 7.0) for the older wording.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DOC = "Ascend/op-plugin docs/context/torch_npu-{}.md"
# FIA page, "Q_S == 1" (decode branch): S (keys per row) <= 262144 (7.1.0 on); with page
# attention block_size non-zero and <= 512 (stated from 7.2.0; the strictest holds here).
FIA_DECODE_MAX_KEYS = 262144
FIA_DECODE_MAX_BLOCK = 512
# FIA page: with a BSH/BSND query, N * D < 65535 (H is one hardware-instruction field).
FIA_BSH_MAX_H = 65535


class NpuContractError(RuntimeError):
    """An argument outside the op's documented contract (the device would refuse it)."""


def _require(ok: bool, op: str, what: str) -> None:
    if not ok:
        raise NpuContractError(f"torch_npu.{op}: {what} [{DOC.format(op)}]")


def _host_ints(x: Any, op: str, name: str) -> list[int]:
    _require(isinstance(x, (list, tuple)) and all(type(i) is int for i in x), op,
             f"{name} must be a host list of int (SymInt[]), got {type(x).__name__}")
    return list(x)


class FakeNpuRuntime:
    """torch_npu.npu: device count and selection, synchronize, mem_get_info."""

    def __init__(self, free_bytes: int, total_bytes: int, device_count: int):
        self.free_bytes, self.total_bytes, self.count = free_bytes, total_bytes, device_count
        self.current = 0

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return self.count

    def set_device(self, index: int) -> None:
        if not 0 <= int(index) < self.count:
            raise RuntimeError(f"torch_npu.npu.set_device: invalid device {index} "
                               f"({self.count} visible)")
        self.current = int(index)

    def synchronize(self, device: Any = None) -> None:
        pass

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return self.free_bytes, self.total_bytes


class FakeTorchNpu:
    def __init__(self, free_bytes: int = 512 << 20, total_bytes: int = 64 << 30,
                 device_count: int = 8, jit_compile: bool = True):
        """`free_bytes` is what npu.mem_get_info reports free: small by default, as an emulated
        KV cache sized from it lives in host memory. `jit_compile=True` (the strictest, and the
        older pages' only mode) adds rotary's D == 128."""
        self.npu = FakeNpuRuntime(free_bytes, total_bytes, device_count)
        self.jit_compile = jit_compile
        self.calls: Counter[str] = Counter()

    # -- torch_npu-npu_rms_norm.md ----------------------------------------------------------------
    def npu_rms_norm(self, input: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        op = "npu_rms_norm"
        self.calls[op] += 1
        _require(input.dtype in (F16, BF16, F32), op, f"input dtype {input.dtype}")
        _require(2 <= input.dim() <= 8, op, f"input has {input.dim()} dims (2 to 8)")
        _require(gamma.dtype == input.dtype, op, f"gamma {gamma.dtype} != input {input.dtype}")
        _require(tuple(gamma.shape) == tuple(input.shape[input.dim() - gamma.dim():]), op,
                 f"gamma {tuple(gamma.shape)} is not input's last dims {tuple(input.shape)}")
        dims = tuple(range(input.dim() - gamma.dim(), input.dim()))
        x = input.float()
        rstd = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + epsilon)
        return (x * rstd * gamma.float()).to(input.dtype), rstd

    # -- torch_npu-npu_rotary_mul.md --------------------------------------------------------------
    def npu_rotary_mul(self, input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor,
                       rotary_mode: str = "half") -> torch.Tensor:
        op = "npu_rotary_mul"
        self.calls[op] += 1
        if rotary_mode != "half":
            raise NotImplementedError("stand-in: rotary_mode='half' only")
        _require(input.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, op,
                 f"input, r1, r2 must be 4-D (BNSD, BSND or SBND; 3-D TND is accepted only "
                 f"from 7.3.0), got {input.dim()}-D, {r1.dim()}-D, {r2.dim()}-D")
        _require(input.dtype in (F16, BF16, F32) and r1.dtype == r2.dtype == input.dtype, op,
                 f"dtypes {input.dtype}, {r1.dtype}, {r2.dtype}")
        a, b, c, d = input.shape
        _require(d % 2 == 0 and d < 896 and (d == 128 or not self.jit_compile), op,
                 f"D = {d} (even, < 896; 128 under jit_compile=True)")
        layouts = {"BNSD": ((1, 1, c), (a, 1, c), (a, b, c), (a, b)),
                   "BSND": ((1, b, 1), (a, b, 1), (a, b, c), (a, c)),
                   "SBND": ((a, 1, 1), (a, b, 1), (a, b, c), (b, c))}
        fits = [name for name, (*ok, (bb, nn)) in layouts.items()
                if tuple(r1.shape[:3]) in ok and bb < 1000 and nn < 1000]
        _require(tuple(r1.shape) == tuple(r2.shape) and r1.shape[3] == d and bool(fits), op,
                 f"r1/r2 {tuple(r1.shape)} fit no layout of input {tuple(input.shape)} "
                 f"(BSND takes 1S1D, BS1D, BSND; B, N < 1000)")
        _require(bool(r1.abs().max() <= 1) and bool(r2.abs().max() <= 1), op,
                 "r1, r2 must lie in [-1, 1]")
        x = input.float()
        x1, x2 = x.chunk(2, dim=-1)
        return (r1.float() * x + r2.float() * torch.cat((-x2, x1), dim=-1)).to(input.dtype)

    # -- torch_npu-npu_swiglu.md ------------------------------------------------------------------
    def npu_swiglu(self, input: torch.Tensor, dim: int = -1) -> torch.Tensor:
        op = "npu_swiglu"
        self.calls[op] += 1
        _require(input.dtype in (F16, BF16, F32), op, f"input dtype {input.dtype}")
        _require(1 <= input.dim() <= 8 and -input.dim() <= dim < input.dim(), op,
                 f"{input.dim()}-D input, dim {dim}")
        _require(input.shape[dim] % 2 == 0, op, f"dim {dim} of size {input.shape[dim]} is odd")
        _require(input.is_contiguous(), op, "non-contiguous input is not supported")
        _require(input.numel() > 0, op, "empty input is not supported")
        a, b = input.float().chunk(2, dim=dim)
        return (F.silu(a) * b).to(input.dtype)

    # -- torch_npu-npu_fused_infer_attention_score.md ---------------------------------------------
    def npu_fused_infer_attention_score(
            self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
            atten_mask: torch.Tensor | None = None, actual_seq_lengths: Any = None,
            actual_seq_lengths_kv: Any = None, block_table: torch.Tensor | None = None,
            num_heads: int = 1, scale: float = 1.0, pre_tokens: int = 2147483647,
            next_tokens: int = 2147483647, input_layout: str = "BSH",
            num_key_value_heads: int = 0, sparse_mode: int = 0, inner_precise: int = 0,
            block_size: int = 0, softmax_lse_flag: bool = False, **others: Any
            ) -> tuple[torch.Tensor, torch.Tensor]:
        op = "npu_fused_infer_attention_score"
        self.calls[op] += 1
        used = sorted(k for k, v in others.items() if v is not None)
        if used or input_layout != "BSH" or block_table is None:
            raise NotImplementedError(f"stand-in: BSH with page attention only (got "
                                      f"{input_layout}, {used or ''})")
        b, s, h, kvh, lens = self._fia_check(query, key, value, block_table, num_heads,
                                             num_key_value_heads, block_size,
                                             actual_seq_lengths_kv)
        qlens = [1] * b
        if s > 1:
            qlens = self._fia_prompt_check(query, h // num_heads, atten_mask, actual_seq_lengths,
                                           sparse_mode, block_size, lens)
        d, bs = h // num_heads, block_size
        out = torch.full((b, s, h), float("nan"), dtype=query.dtype)   # padding stays NaN
        lse = torch.full((b, num_heads, s, 1), float("nan"))           # the page's (B, N, S, 1)
        for i in range(b):
            n, kv_len = qlens[i], lens[i]
            blocks = block_table[i, :-(-kv_len // bs)].long()
            g = num_heads // kvh
            kk = key[blocks].reshape(-1, kvh, d)[:kv_len].float().repeat_interleave(g, 1)
            vv = value[blocks].reshape(-1, kvh, d)[:kv_len].float().repeat_interleave(g, 1)
            qq = query[i, :n].float().view(n, num_heads, d)
            sc = torch.einsum("qhd,khd->hqk", qq, kk) * scale                  # [N, n, kv]
            if s > 1 and sparse_mode == 3:   # rightDownCausal
                seen = torch.arange(kv_len)[None, :] <= (kv_len - n + torch.arange(n))[:, None]
                sc = sc.masked_fill(~seen, float("-inf"))
            o = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv)
            out[i, :n] = o.reshape(n, h).to(query.dtype)
            lse[i, :, :n, 0] = torch.logsumexp(sc, -1)
        # softmax_lse_flag=False: the page's [1] tensor of 0
        return out, (lse if softmax_lse_flag else torch.zeros(1))

    @staticmethod
    def _fia_check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   table: torch.Tensor, num_heads: int, num_kv_heads: int, block_size: int,
                   lens_kv: Any) -> tuple[int, int, int, int, list[int]]:
        op = "npu_fused_infer_attention_score"
        _require(query.dtype in (F16, BF16), op, f"query dtype {query.dtype} (float16/bfloat16)")
        _require(key.dtype == value.dtype == query.dtype, op,
                 f"key/value {key.dtype}/{value.dtype} with query {query.dtype} (no quantization)")
        _require(all(t.is_contiguous() for t in (query, key, value)), op,
                 "non-contiguous query/key/value are not supported")
        _require(query.dim() == 3, op, f"BSH query must be 3-D, got {tuple(query.shape)}")
        b, s, h = query.shape
        kvh = num_kv_heads or num_heads
        _require(isinstance(num_heads, int) and num_heads > 0 and h % num_heads == 0, op,
                 f"num_heads {num_heads} does not divide H {h}")
        d = h // num_heads
        _require(num_heads % kvh == 0 and num_heads // kvh <= 64, op,
                 f"num_heads {num_heads} / num_key_value_heads {kvh}: an integer <= 64")
        _require(b <= 65536 and num_heads <= 256 and d <= 512, op, f"B {b}, N {num_heads}, D {d}")
        _require(h < FIA_BSH_MAX_H, op, f"BSH query: N*D = {num_heads}*{d} = {h} must be < "
                 f"{FIA_BSH_MAX_H}")
        _require(key.dim() == 3 and key.shape == value.shape, op,
                 f"page attention with a BSH query takes caches (blocknum, blocksize, H); got "
                 f"{tuple(key.shape)}, {tuple(value.shape)}")
        nb, bs, kv_h = key.shape
        _require(bs == block_size and kv_h == kvh * d and kv_h <= 65535, op,
                 f"cache {tuple(key.shape)} for block_size {block_size}, {kvh} KV heads x {d}")
        _require(key.numel() < 2**31, op, "a cache's elements must fit in int32")
        _require(table.dtype == torch.int32 and table.dim() == 2 and table.shape[0] == b, op,
                 f"block_table must be int32 [B={b}, max_blocks], got {table.dtype} "
                 f"{tuple(table.shape)}")
        lens = _host_ints(lens_kv, op, "actual_seq_lengths_kv")
        _require(len(lens) == 1 or len(lens) >= b, op, f"{len(lens)} kv lengths for B {b}")
        lens = lens * b if len(lens) == 1 else lens[:b]
        need = [-(-n // bs) for n in lens]
        _require(min(lens) >= 0 and table.shape[1] >= max(need), op,
                 f"block_table width {table.shape[1]} < {max(need)} blocks of the longest row")
        _require(sum(need) <= nb, op, f"blocknum {nb} < {sum(need)}, the rows' blocks summed")
        used = torch.cat([table[i, :need[i]] for i in range(b)]) if b else table[:0, 0]
        _require(bool(((used >= 0) & (used < nb)).all()), op, "block id outside the cache")
        if s == 1:
            _require(0 < block_size <= FIA_DECODE_MAX_BLOCK and block_size % 16 == 0, op,
                     f"block_size {block_size}: query S = 1 with page attention takes a "
                     f"multiple of 16 (fp16/bf16), non-zero and <= {FIA_DECODE_MAX_BLOCK} "
                     f"(op-plugin 7.2.0 on)")
            _require(max(lens, default=0) <= FIA_DECODE_MAX_KEYS, op,
                     f"actual_seq_lengths_kv up to {max(lens)}: query S = 1 takes S <= "
                     f"{FIA_DECODE_MAX_KEYS} keys per row")
        return b, s, h, kvh, lens

    @staticmethod
    def _fia_prompt_check(query: torch.Tensor, d: int, mask: torch.Tensor | None, lens_q: Any,
                          sparse_mode: int, block_size: int, lens_kv: list[int]) -> list[int]:
        op = "npu_fused_infer_attention_score"
        b, s, h = query.shape
        _require(128 <= block_size <= 512 and block_size % 128 == 0, op,
                 f"block_size {block_size}: page attention with query S > 1 takes 128..512 by 128")
        _require(d % 16 == 0, op, f"D {d} must be 16-aligned for fp16/bf16 when query S > 1")
        qlens = _host_ints(lens_q, op, "actual_seq_lengths")
        _require(len(qlens) == 1 or len(qlens) >= b, op, f"{len(qlens)} q lengths for B {b}")
        qlens = qlens * b if len(qlens) == 1 else qlens[:b]
        _require(all(1 <= n <= s for n in qlens), op, f"q lengths {qlens} outside [1, S={s}]")
        if sparse_mode not in (0, 3):
            raise NotImplementedError(f"stand-in: sparse_mode 0 or 3, got {sparse_mode}")
        if sparse_mode == 3:
            _require(mask is not None and mask.dtype in (torch.bool, torch.int8, torch.uint8)
                     and tuple(mask.shape)[-2:] == (2048, 2048) and mask.dim() in (2, 3, 4)
                     and mask.numel() == 2048 * 2048, op,
                     "sparse_mode=3 takes the compressed 2048 x 2048 atten_mask (bool/int8/uint8)")
            want = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
            _require(torch.equal(mask.reshape(2048, 2048).bool(), want), op,
                     "sparse_mode=3: atten_mask must be 1 (masked) exactly above the diagonal")
            _require(all(n <= c for n, c in zip(qlens, lens_kv)), op,
                     f"sparse_mode=3 needs q lengths {qlens} <= kv lengths {lens_kv}")
        else:
            _require(mask is None, op, "stand-in: sparse_mode=0 without a mask only")
        return qlens
