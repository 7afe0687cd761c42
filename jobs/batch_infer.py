#!/usr/bin/env python
"""Batch inference over Parquet with tensor-parallel InternLM2 on Ray.

    python jobs/batch_infer.py model.path=/ckpt/internlm2-chat-7b parallel.tp=2 \
        data.input=prompts.parquet data.output=out/
    ray job submit --working-dir . -- python jobs/batch_infer.py key=value ...

With no model.path it runs the embedded demo (a tiny random-weight checkpoint, CPU, local Ray).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from internlm2_tp.cli import main_guard  # noqa: E402


def main(argv: list[str]) -> int:
    from internlm2_tp.job_config import load_job_config
    from internlm2_tp.runtime.driver import Job

    overrides = list(argv)
    cfg = load_job_config(ROOT / "conf" / "batch_infer.yaml", overrides)
    demo = not cfg.model.path
    if demo:
        from internlm2_tp.demo import prepare_demo

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
    from internlm2_tp.runtime.ray_cluster import disconnect

    try:
        pool = make_ray_pool(cfg)
        manifest = job.run(pool)   # shuts the pool down (kills every actor) however it ends
    finally:
        disconnect()   # and stops a cluster the job started itself
    print_summary(manifest, cfg.data.output)
    return 0


def make_ray_pool(cfg):
    """Join the job's cluster (ray_cluster.find_cluster says which) and size its groups."""
    from internlm2_tp.parallel.platform import PLATFORMS
    from internlm2_tp.runtime.ray_cluster import connect
    from internlm2_tp.runtime.ray_pool import RayPool, cluster_device, rank_cpus
    from internlm2_tp.runtime.worker import WorkerSpec

    # A cluster on this machine (a new one, or one `ray start`ed here): its workers import
    # this checkout.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    connect(cfg.ray.address, cfg.ray.connect_timeout_s,
            runtime_env={"env_vars": {"PYTHONPATH": path}})
    device = cluster_device(cfg.parallel.device)
    cpus = rank_cpus(device, cfg.parallel.tp, cfg.parallel.replicas, cfg.ray.cpus_per_worker)
    spec = WorkerSpec(model_path=str(Path(cfg.model.path).resolve()), dtype=cfg.model.dtype,
                      device=device, tp=cfg.parallel.tp, rank=0, master_addr="127.0.0.1",
                      master_port=0, engine=cfg.engine, timeout_s=cfg.parallel.timeout_s,
                      env=PLATFORMS[device]().job_env(cfg.parallel),
                      threads=max(1, int(cpus)) if device == "cpu" else 0,
                      need_tokenizer=bool(cfg.generation.stop))
    return RayPool(spec, cfg.parallel.replicas, device, float(cpus), cfg.parallel.timeout_s,
                   start_retries=cfg.ray.max_group_restarts)


def print_summary(manifest: dict, out: str) -> None:
    """A few rows and the totals, read back through the same filesystem layer as the job's
    (a local directory or an object-store prefix)."""
    from internlm2_tp.runtime.output_dir import head_rows
    from internlm2_tp.runtime.storage import resolve

    print("\nFirst rows:")
    for r in head_rows(out, 5):
        text = r["completion"].replace("\n", "\\n")
        print(f"  id={r['id']} {r['finish_reason']:6} {r['completion_tokens']:4} tok  "
              f"{text[:70]!r}{' ERROR: ' + r['error'] if r['error'] else ''}")
    keys = ("rows_total", "rows_this_run", "rows_done_before", "errors", "completion_tokens",
            "wall_s", "rows_per_s", "output_tokens_per_s", "group_restarts")
    print("\nSummary: " + ", ".join(f"{k}={manifest[k]}" for k in keys))
    uri = resolve(out, "data.output").uri
    print(f"Output: {uri}/part-*.parquet, manifest {uri}/_manifest.json")


if __name__ == "__main__":
    sys.exit(main_guard(main, sys.argv[1:], handle_sigterm=True))
