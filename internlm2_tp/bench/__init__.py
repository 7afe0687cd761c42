"""Benchmark runners and the roofline they are measured against (jobs/benchmark.py runs them).

    common.py       the prompt set, peak memory, the page-cache warm-up
    roofline.py     work executed per run, matmul peak and streaming-read bandwidth, the bound
    ours.py         our engine (tp 1, 2), one process per rank
    hf.py           transformers `generate`
    vllm_runner.py  vLLM, started with its own environment's python (imports nothing from here)
    job.py          jobs/batch_infer.py end to end on the same prompts (local Ray, tp 1)
    suite.py        one run of all of them; report.py the table, the ratios and the targets

Each runner runs in a fresh process (`python -m internlm2_tp.bench RUNNER ARGS.json`), so peak
RSS is per process and the machine's noise is shared by all.
"""
from __future__ import annotations

from internlm2_tp.bench.common import make_prompts, peak_rss_mb, read_files_s
from internlm2_tp.bench.roofline import (Machine, Shape, matmul_peak_gflops, prefix_hits,
                                         run_work, stream_read_gbs)


def flops_per_token(cfg) -> float:  # noqa: ANN001 - a ModelConfig
    """Matmul FLOPs of one generated token, weights only (the old benchmark's "ceiling"
    numerator; roofline.RunWork counts what a run really executes)."""
    return Shape.of(cfg, "bfloat16").weight_flops_per_output_token()


__all__ = ["Machine", "Shape", "flops_per_token", "make_prompts", "matmul_peak_gflops",
           "peak_rss_mb", "prefix_hits", "read_files_s", "run_work", "stream_read_gbs"]
