#!/usr/bin/env python
"""Print the per-rank device memory plan of a tensor-parallel InternLM2 group.

    python jobs/memory_plan.py model.path=/models/internlm2-chat-20b parallel.tp=8 \
        device_gb=64 dtype=float16
    python jobs/memory_plan.py preset=internlm2-chat-20b parallel.tp=8 device_gb=64 dtype=float16

Give exactly one of model.path (reads only config.json) or preset (published shapes:
internlm2-{,chat-}{1_8b,7b,20b}). device_gb is GiB of device memory per rank (910B2: 64);
utilization, block_size and max_model_len mean what engine.* do in the job. Unknown keys and
wrong types are refused naming the key.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from internlm2_tp.cli import main_guard
from internlm2_tp.config import DTYPE_BYTES, ModelConfig, check_dtype_setting
from internlm2_tp.errors import JobConfigError, UserError


@dataclass
class ModelArgs:
    path: str = ""


@dataclass
class ParallelArgs:
    tp: int = 1


@dataclass
class Args:
    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    preset: str = ""
    device_gb: float = 64.0           # GiB per device
    dtype: str = "auto"               # auto (the checkpoint's torch_dtype), float16, bfloat16, float32
    utilization: float = 0.9          # share of the memory left after the weights for the KV cache
    block_size: int = 128
    max_model_len: int = 0            # 0: the model's context (x rope scaling factor)
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192, 32768])


def parse(argv: list[str]) -> Args:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [a for a in argv if "=" not in a]
    if bad:
        raise JobConfigError(f"argument {bad[0]!r} is not key=value")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Args), OmegaConf.from_dotlist(argv))
        args = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise JobConfigError(f"key {key!r}: {str(e).splitlines()[0]}" if key else str(e)) from e
    assert isinstance(args, Args)
    if bool(args.model.path) == bool(args.preset):
        raise JobConfigError("give exactly one of model.path=DIR or preset=NAME")
    check_dtype_setting(args.dtype, "dtype")
    if args.device_gb <= 0:
        raise JobConfigError(f"device_gb must be > 0, got {args.device_gb}")
    return args


def main(argv: list[str]) -> int:
    from internlm2_tp.tools.memory_plan import GiB, plan, preset

    args = parse(argv)
    try:
        cfg = ModelConfig.from_dir(args.model.path) if args.model.path else preset(args.preset)
        dtype = cfg.torch_dtype if args.dtype == "auto" else args.dtype
        p = plan(cfg, args.parallel.tp, DTYPE_BYTES[dtype], int(args.device_gb * GiB),
                 args.utilization, args.block_size, args.max_model_len)
    except UserError:
        raise
    except ValueError as e:  # a plan that cannot be: the message names the setting
        raise JobConfigError(str(e)) from e
    print(f"dtype {dtype}")
    print(p.describe(tuple(args.lengths)))
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main, sys.argv[1:]))
