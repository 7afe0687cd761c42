"""How big the paged KV cache is, and what a rank's engine found at start.

The sizing rule lives here once: the engine applies it at start to the device memory its group
agrees is free after loading, and the memory plan (tools/memory_plan.py) predicts it from a
device's size and the weights. `RuntimeFacts` is the engine's account of itself (cache, weights,
context, eos ids), shipped to the driver as it is. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

from internlm2_tp.config import ModelConfig, kv_heads_per_rank

KV_UTILIZATION = 0.9      # of the device memory free after loading; the rest is headroom for
                          # activations and the runtime
CPU_KV_BYTES = 2**30      # where the device reports no free-memory figure (CPU)


def kv_bytes_per_token(cfg: ModelConfig, tp: int, dtype_bytes: int) -> int:
    """Keys and values of one token, every layer, on one rank (its own KV heads only)."""
    heads = kv_heads_per_rank(cfg.num_key_value_heads, tp)
    return 2 * cfg.num_hidden_layers * heads * cfg.head_dim * dtype_bytes


def kv_budget_bytes(free_bytes: float | None, utilization: float = KV_UTILIZATION) -> float:
    """The cache's share of the memory free after loading (CPU_KV_BYTES when unknown)."""
    return float(CPU_KV_BYTES) if free_bytes is None else utilization * free_bytes


def num_kv_blocks(budget_bytes: float, bytes_per_token: int, block_size: int) -> int:
    """Whole blocks of `block_size` tokens that fit the budget (0 when not even one does)."""
    return int(budget_bytes // (bytes_per_token * block_size))


def context_len(cfg: ModelConfig) -> int:
    """The model's context: max_position_embeddings times the rope scaling factor."""
    factor = cfg.rope_scaling.factor if cfg.rope_scaling else 1
    return int(cfg.max_position_embeddings * factor)


def max_model_len(cfg: ModelConfig, setting: int, num_blocks: int, block_size: int) -> int:
    """engine.max_model_len (0: the model's context), never more than the cache holds."""
    return min(setting or context_len(cfg), num_blocks * block_size)


@dataclass(frozen=True)
class RuntimeFacts:
    """What the engine found out at start (not configuration)."""
    num_blocks: int                   # agreed by the group (the smallest rank's figure)
    block_size: int
    cache_tokens: int
    kv_bytes_per_token: int           # per rank
    weight_bytes: int                 # per rank
    max_model_len: int
    eos_ids: tuple[int, ...]
    rank_blocks: tuple[int, ...] = ()  # what each rank's own memory allowed, before agreeing

    def describe(self) -> str:
        return (f"weights {self.weight_bytes / 2**30:.3f} GiB/rank; KV {self.kv_bytes_per_token} "
                f"B/token/rank; cache {self.num_blocks} blocks x {self.block_size} = "
                f"{self.cache_tokens} tokens; max_model_len {self.max_model_len}")
