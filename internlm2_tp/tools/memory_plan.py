"""Device memory plan for one tensor-parallel rank, as a pure function of the model's shape.

It predicts what the engine's `plan_cache` finds at start, without a device or a checkpoint, by
the engine's own sizing rule (engine/cache_plan.py): the weight bytes a rank holds (exactly the
parameters InternLM2Model allocates: its share of every sharded matmul, the replicated RMSNorm
weights, its vocab-parallel slice of the embedding and of the output head, padded to
ceil(vocab / tp) rows), the KV bytes per token (each rank caches only its own KV heads; past
tp = kv_heads every rank holds one replicated KV head, so the per-rank cost stops shrinking), and
how many tokens and sequences the paged cache holds when `utilization` of the memory left after
the weights goes to it (the engine's rule: KV_UTILIZATION of the free device memory after
loading; the rest is headroom for activations and the runtime).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from internlm2_tp.config import ModelConfig, RopeScaling, check_tp, kv_heads_per_rank
from internlm2_tp.engine.cache_plan import (KV_UTILIZATION, context_len, kv_budget_bytes,
                                            kv_bytes_per_token, max_model_len, num_kv_blocks)

GiB = 2**30

# Published shapes (config.json of the official checkpoints). rope_scaling varies by revision;
# these are the current chat revisions' (base: none). A checkpoint's own config.json wins.
_SHAPES = {"1_8b": (2048, 16, 24, 8192), "7b": (4096, 32, 32, 14336), "20b": (6144, 48, 48, 16384)}
_CHAT_ROPE = {"1_8b": 2.0, "7b": 2.0, "20b": 3.0}


def _preset(size: str, chat: bool) -> ModelConfig:
    hidden, heads, layers, ffn = _SHAPES[size]
    name = f"internlm2-{'chat-' if chat else ''}{size}"
    return ModelConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=8,
                       intermediate_size=ffn, num_hidden_layers=layers, vocab_size=92544,
                       rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
                       rope_scaling=RopeScaling("dynamic", _CHAT_ROPE[size]) if chat else None,
                       eos_token_id=(2, 92542) if chat else (2,), source=f"preset {name}")


PRESETS: dict[str, ModelConfig] = {
    f"internlm2-{'chat-' if chat else ''}{size}": _preset(size, chat)
    for size in _SHAPES for chat in (False, True)}

# InternLM2.5 chat models (config.json of each): the same shapes and layout, other RoPE settings
# (size, rope_theta, dynamic factor, max_position_embeddings).
_V2_5 = {"internlm2_5-1_8b-chat": ("1_8b", 1e6, 2.0, 32768),
         "internlm2_5-7b-chat": ("7b", 1e6, 2.0, 32768),
         "internlm2_5-7b-chat-1m": ("7b", 5e7, 2.5, 262144),
         "internlm2_5-20b-chat": ("20b", 5e7, 2.5, 32768)}
for _name, (_size, _theta, _factor, _max_pos) in _V2_5.items():
    PRESETS[_name] = replace(_preset(_size, True), rope_theta=_theta,
                             rope_scaling=RopeScaling("dynamic", _factor),
                             max_position_embeddings=_max_pos, source=f"preset {_name}")


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not one of {sorted(PRESETS)}")
    return PRESETS[name]


def weight_params(cfg: ModelConfig, tp: int) -> dict[str, int]:
    """Parameters one rank allocates, by part (mirrors parallel/layers.py and model.py)."""
    check_tp(cfg, tp)
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_local = cfg.num_attention_heads // tp
    kv_local = kv_heads_per_rank(cfg.num_key_value_heads, tp)   # replicated past tp = kv_heads
    per_layer = ((q_local + 2 * kv_local) * d * h            # wqkv: this rank's q, k, v rows
                 + h * q_local * d                           # wo: row-parallel columns
                 + 2 * (f // tp) * h                         # w1 | w3 merged
                 + h * (f // tp))                            # w2
    vocab_rows = -(-cfg.vocab_size // tp)                    # padded to a multiple of tp
    return {"layers": cfg.num_hidden_layers * per_layer,
            "norms": (2 * cfg.num_hidden_layers + 1) * h,     # replicated on every rank
            "embedding": vocab_rows * h,
            # untied: its own copy, even if tied; a reward model's v_head: one fp32 row, counted
            # at the run's dtype (a rounding error of one row)
            "output": vocab_rows * h if cfg.task == "generate" else h}


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    tp: int
    dtype_bytes: int
    device_bytes: int
    utilization: float
    block_size: int
    num_layers: int
    kv_heads_local: int
    kv_heads: int
    head_dim: int
    params: dict[str, int] = field(repr=False)
    weight_bytes: int                 # per rank
    kv_bytes_per_token: int           # per rank (keys + values, all layers)
    kv_budget_bytes: int              # per rank
    num_blocks: int
    context_len: int                  # max_position_embeddings x rope factor
    max_model_len: int                # min(context or engine.max_model_len, cache tokens)

    @property
    def cache_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def max_seqs(self, length: int) -> int:
        """Sequences of `length` tokens (prompt + completion) the cache holds at once."""
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        return self.num_blocks // -(-length // self.block_size)

    def describe(self, lengths: tuple[int, ...] = (2048, 4096, 8192, 32768)) -> str:
        p, g = self.params, GiB
        total = sum(p.values())
        kv_note = (f", KV heads replicated over tp/{self.kv_heads} = "
                   f"{self.tp // self.kv_heads} ranks" if self.tp > self.kv_heads else "")
        lines = [
            f"{self.model}: tp={self.tp}, {self.dtype_bytes} B/param, "
            f"{self.device_bytes / g:.2f} GiB/device, utilization {self.utilization}, "
            f"block_size {self.block_size}",
            f"  weights per rank:    {self.weight_bytes / g:.3f} GiB ({total:,} params: layers "
            f"{p['layers']:,}, embedding {p['embedding']:,}, output {p['output']:,}, "
            f"norms {p['norms']:,})",
            f"  KV per token/rank:   {self.kv_bytes_per_token:,} B (2 x {self.num_layers} "
            f"layers x {self.kv_heads_local} KV head(s) x {self.head_dim} x "
            f"{self.dtype_bytes} B{kv_note})",
            f"  KV budget per rank:  {self.utilization} x ({self.device_bytes / g:.2f} - "
            f"{self.weight_bytes / g:.3f}) GiB = {self.kv_budget_bytes / g:.2f} GiB",
            f"  KV cache per rank:   {self.num_blocks:,} blocks x {self.block_size} = "
            f"{self.cache_tokens:,} tokens",
            f"  max_model_len:       {self.max_model_len:,} (context {self.context_len:,})",
            "  concurrent sequences at a length (prompt + completion; the engine also caps "
            "them at engine.max_num_seqs):"]
        lines += [f"    {n:>7,} tokens: {self.max_seqs(n):,}" for n in lengths]
        return "\n".join(lines)


def plan(cfg: ModelConfig, tp: int, dtype_bytes: int, device_bytes: int,
         utilization: float = KV_UTILIZATION, block_size: int = 128,
         max_len: int = 0) -> MemoryPlan:
    """The memory plan of one rank of a tp-way group on a device of `device_bytes`."""
    if dtype_bytes not in (1, 2, 4):
        raise ValueError(f"dtype_bytes must be 1, 2 or 4, got {dtype_bytes}")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if block_size < 1:
        raise ValueError(f"engine.block_size must be >= 1, got {block_size}")
    params = weight_params(cfg, tp)
    weights = sum(params.values()) * dtype_bytes
    if weights >= device_bytes:
        raise ValueError(f"{cfg.source}: the weights need {weights / GiB:.2f} GiB per rank at "
                         f"tp={tp}, more than the {device_bytes / GiB:.2f} GiB device: raise "
                         "parallel.tp or use a smaller dtype")
    per_tok = kv_bytes_per_token(cfg, tp, dtype_bytes)
    budget = kv_budget_bytes(device_bytes - weights, utilization)
    blocks = num_kv_blocks(budget, per_tok, block_size)
    if blocks < 1:
        raise ValueError(f"{cfg.source}: no room for one KV block of {block_size} tokens at "
                         f"tp={tp} (budget {budget / GiB:.3f} GiB)")
    ctx = context_len(cfg)
    return MemoryPlan(
        model=cfg.source, tp=tp, dtype_bytes=dtype_bytes, device_bytes=device_bytes,
        utilization=utilization, block_size=block_size, num_layers=cfg.num_hidden_layers,
        kv_heads_local=kv_heads_per_rank(cfg.num_key_value_heads, tp),
        kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        params=params, weight_bytes=weights, kv_bytes_per_token=per_tok,
        kv_budget_bytes=int(budget), num_blocks=blocks, context_len=ctx,
        max_model_len=max_model_len(cfg, max_len, blocks, block_size))
