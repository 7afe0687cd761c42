#!/usr/bin/env python
"""Where a tp=1 CPU run's time goes, by op family (torch.profiler), for a before/after compare.

    python scripts/profile_step.py CKPT [rows=64] [new_tokens=32] [dtype=bfloat16]
    PYTHONPATH=/path/to/older/checkout python scripts/profile_step.py CKPT   # the same, older code

Runs the job's own Worker (tp=1) on CKPT (e.g. the benchmark's bench_out/ckpt-internlm2), warms
up, then profiles one run of `rows` prompts x `new_tokens` and prints wall time, tok/s and each
op family's share of it; "host" is the wall time no aten op accounts for (Python, scheduling,
metadata). Uses only APIs older checkouts have too.
"""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

FAMILIES = (("gemm", ("mm", "addmm", "linear", "matmul", "bmm", "mkldnn", "onednn")),
            ("attention", ("attention", "softmax", "index_select", "gather")),
            ("norm/act", ("rms_norm", "silu", "mul", "rsqrt", "pow", "mean")),
            ("sample", ("max", "argmax", "amax", "topk", "sort", "multinomial", "exponential")),
            ("collective", ("all_reduce", "allreduce", "shm")))


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other ops"


def main(argv: list[str]) -> int:
    from internlm2_tp.engine.engine import EngineConfig
    from internlm2_tp.engine.sampler import SamplingParams
    from internlm2_tp.runtime.data.rows import Request
    from internlm2_tp.runtime.worker import Worker, WorkerSpec

    ckpt, opts = argv[0], dict(a.split("=", 1) for a in argv[1:])
    rows, new = int(opts.get("rows", 64)), int(opts.get("new_tokens", 32))
    spec = WorkerSpec(model_path=ckpt, dtype=opts.get("dtype", "bfloat16"), device="cpu", tp=1,
                      rank=0, master_addr="127.0.0.1", master_port=29511,
                      engine=EngineConfig(max_num_seqs=rows, max_num_batched_tokens=4096),
                      threads=os.cpu_count() or 2)
    w = Worker(spec)
    w.setup()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 90000, (int(torch.randint(16, 65, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(2 * rows)]
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    w.run([Request(f"w{i}", p, params) for i, p in enumerate(prompts[rows:])], rows)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        done, _ = w.run([Request(i, p, params) for i, p in enumerate(prompts[:rows])], rows)
        wall = time.perf_counter() - t
    shares: dict[str, float] = defaultdict(float)
    other: list[tuple[float, str]] = []
    for ev in prof.key_averages():
        shares[family(ev.key)] += ev.self_cpu_time_total / 1e6
        if family(ev.key) == "other ops":
            other.append((ev.self_cpu_time_total / 1e6, ev.key))
    shares["host"] = max(0.0, wall - sum(shares.values()))
    toks = sum(len(f.output_ids) for f in done)
    print(f"rows {rows} x {new} tokens: wall {wall:.2f} s, {toks / wall:.1f} tok/s "
          f"(profiler on)")
    for fam, s in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:<12} {s:7.2f} s  {100 * s / wall:5.1f}%")
    print("  largest other ops: " + ", ".join(f"{k} {s:.2f} s" for s, k in sorted(other)[-5:][::-1]))
    w.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
