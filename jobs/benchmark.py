#!/usr/bin/env python
"""Throughput, side by side, in one run: our engine (tp=1, tp=2), the job end to end
(jobs/batch_infer.py on local Ray, tp=1), transformers `generate` and vLLM (when its
environment exists), on the same checkpoint and prompts, each against the run's roofline.

    python jobs/benchmark.py [rows=64 new_tokens=32 concurrency=[16,64,256] tp=[1,2] \
        peers=[job,hf,vllm] ...]

Writes (or takes, ckpt=DIR) a bf16 checkpoint of the 20B's shape ratios scaled to 2 CPU cores
(48 q / 8 KV heads, vocab 92544, 4 layers, hidden 1536) and its Llama-layout conversion;
measures the matmul peak and streaming-read bandwidth at the start and end of the run; prints a
table, the ratios and the issue's targets, and writes out_dir/benchmark.json. Each engine runs
in a fresh process (internlm2_tp/bench/).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class BenchConfig:
    out_dir: str = "bench_out"
    ckpt: str = ""                   # "": write the benchmark checkpoint under out_dir
    rows: int = 64                   # the headline run
    new_tokens: int = 32
    min_prompt: int = 16
    max_prompt: int = 64
    shared_prefix_frac: float = 0.5  # part of the rows start with one shared system prompt
    prefix_len: int = 32
    concurrency: list[int] = field(default_factory=lambda: [16, 64, 256])
    tp: list[int] = field(default_factory=lambda: [1, 2])
    peers: list[str] = field(default_factory=lambda: ["job", "hf", "vllm"])
    vllm_python: str = "/opt/vllm-venv/bin/python"
    dtype: str = "auto"              # auto: bf16 on a CPU with native bf16, else fp32 (see below)
    checkpoint_dtype: str = "bfloat16"  # the benchmark checkpoint is stored as published
    block_size: int = 16
    seed: int = 0
    repeats: int = 3                 # runs per size and engine (fresh prompts each); the fastest counts
    passes: int = 1                  # rounds over the engines, every other one in reverse order

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.passes < 1:
            raise ValueError(f"repeats and passes must be >= 1, got {self.repeats}, {self.passes}")
        unknown = sorted(set(self.peers) - {"job", "hf", "vllm"})
        if unknown:
            raise ValueError(f"peers: unknown {unknown}; choose from job, hf, vllm")


def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from internlm2_tp.bench.report import write_report
    from internlm2_tp.bench.suite import run_suite

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig),
                                              OmegaConf.from_dotlist(argv)))
    if cfg.dtype == "auto":
        # Every engine runs in the dtype this CPU multiplies fastest: bf16 needs AVX512-BF16 or
        # AMX; elsewhere bf16 is emulated (~100x slower than fp32) and fp32 is the only choice.
        from internlm2_tp.config import cpu_has_fast_bf16
        cfg.dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"
    print(f"dtype {cfg.dtype}", flush=True)
    write_report(cfg, run_suite(cfg), Path(cfg.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
