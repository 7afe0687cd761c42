"""EngineConfig: the engine's settings (the job's `engine.*` section), validated once, here.

Torch-free, so that loading and checking the job's configuration imports no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from internlm2_tp.errors import JobConfigError


@dataclass
class EngineConfig:
    block_size: int = 128             # 128 as the Ascend attention kernels expect
    max_num_seqs: int = 256           # sequences in flight per step
    max_num_batched_tokens: int = 2048  # tokens per step; longer prompts are prefilled in chunks
    max_model_len: int = 0            # 0: the model's context (times the rope scaling factor)
    enable_prefix_caching: bool = True
    kv_cache_gb: float = 0.0          # 0: 90% of free device memory on cuda/npu, 1 GiB on cpu
    num_kv_blocks: int = 0            # > 0 overrides kv_cache_gb (tests force preemption with it)

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise JobConfigError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_gb"):
            if getattr(self, name) < 0:
                raise JobConfigError(f"engine.{name} must be >= 0, got {getattr(self, name)}")
