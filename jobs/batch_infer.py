#!/usr/bin/env python
"""Batch inference over Parquet with tensor-parallel InternLM2 on Ray.

    python jobs/batch_infer.py model.path=/ckpt/internlm2-chat-7b parallel.tp=2 \
        data.input=prompts.parquet data.output=out/
    ray job submit --working-dir . -- python jobs/batch_infer.py key=value ...

With no model.path it runs the embedded demo (a tiny random-weight checkpoint, CPU, local Ray).
"""
from __future__ import annotations

import sys
from pathlib import Path

from internlm2_tp.cli import main_guard

ROOT = Path(__file__).resolve().parents[1]   # the checkout: conf/ and the demo's output


def main(argv: list[str]) -> int:
    from internlm2_tp.job_config import load_job_config
    from internlm2_tp.runtime.driver import Job

    overrides = list(argv)
    cfg = load_job_config(ROOT / "conf" / "batch_infer.yaml", overrides)
    demo = not cfg.model.path
    if demo:
        from internlm2_tp.testing.demo import prepare_demo

        print("No model.path given: running the embedded demo (a tiny RANDOM-WEIGHT InternLM2, "
              "so completions are gibberish).\nFor a real model: python jobs/batch_infer.py "
              "model.path=/path/to/internlm2-chat-7b parallel.tp=2 data.input=prompts.parquet "
              "data.output=out/", flush=True)
        ckpt, data, out = prepare_demo(ROOT / "demo_out")
        extra = [f"model.path={ckpt}", f"data.input={data}", f"data.output={out}"]
        if not any(o.startswith("generation.max_new_tokens=") for o in overrides):
            extra.append("generation.max_new_tokens=32")
        if not any(o.startswith("parallel.device=") for o in overrides):
            extra.append("parallel.device=cpu")
        cfg = load_job_config(ROOT / "conf" / "batch_infer.yaml", overrides + extra)
    job = Job(cfg)   # every cheap check (config, checkpoint, input, output dir) before Ray starts
    from internlm2_tp.runtime.cluster.ray_cluster import disconnect
    from internlm2_tp.runtime.cluster.ray_pool import RayPool

    try:
        pool = RayPool.from_job(cfg)   # joins the job's cluster and sizes its groups
        manifest = job.run(pool)   # shuts the pool down (kills every actor) however it ends
    finally:
        disconnect()   # and stops a cluster the job started itself
    print_summary(manifest, cfg.data.output)
    return 0


def print_summary(manifest: dict, out: str) -> None:
    """A few rows and the totals, read back through the same filesystem layer as the job's
    (a local directory or an object-store prefix)."""
    from internlm2_tp.runtime.data.output_dir import head_rows
    from internlm2_tp.runtime.data.storage import resolve

    print("\nFirst rows:")
    for r in head_rows(out, 5):
        text = r["completion"].replace("\n", "\\n")
        shown = f"reward {r['reward']:.4f}" if r.get("reward") is not None else f"{text[:70]!r}"
        print(f"  id={r['id']} {r['finish_reason']:6} {r['completion_tokens']:4} tok  "
              f"{shown}{' ERROR: ' + r['error'] if r['error'] else ''}")
    keys = ("rows_total", "rows_this_run", "rows_done_before", "errors", "completion_tokens",
            "wall_s", "rows_per_s", "output_tokens_per_s", "group_restarts")
    print("\nSummary: " + ", ".join(f"{k}={manifest[k]}" for k in keys))
    uri = resolve(out, "data.output").uri
    print(f"Output: {uri}/part-*.parquet, manifest {uri}/_manifest.json")


if __name__ == "__main__":
    sys.exit(main_guard(main, sys.argv[1:], handle_sigterm=True))
