"""The job row: the benchmark's prompts written to Parquet and run through jobs/batch_infer.py
(its config file, Job and RayPool.from_job, in this process) on a local Ray cluster of its own,
tp 1, with the engine settings the engine rows use.

Throughput is completion tokens over the time from the group being ready (Ray started, actor
placed, weights loaded: reported apart as start and load) until every row is written to its
shard and the pool is shut down: the driver, Ray round trips, detokenization and Parquet
writes are all inside it, which is what the engine rows leave out.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from internlm2_tp.bench.common import best_of, peak_rss_mb, process_peak_rss_mb

ROOT = Path(__file__).resolve().parents[2]


def _overrides(args: dict, data: Path, out: Path) -> list[str]:
    eng = args.get("engine", {})
    return [f"model.path={args['ckpt']}", f"model.dtype={args['dtype']}",
            f"data.input={data}", f"data.output={out}", "data.overwrite=true",
            "parallel.tp=1", "parallel.device=cpu", "ray.address=local",
            f"generation.max_new_tokens={args['new_tokens']}", "generation.ignore_eos=true",
            *(f"engine.{k}={v}" for k, v in eng.items())]


def _one(args: dict, rows: list[list[int]], d: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from internlm2_tp.job_config import load_job_config
    from internlm2_tp.runtime.driver import Job
    from internlm2_tp.runtime.cluster.pool import GroupResult
    from internlm2_tp.runtime.cluster.ray_pool import RayPool

    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    pq.write_table(pa.table({"id": list(range(len(rows))), "prompt_token_ids": rows}),
                   d / "prompts.parquet")
    cfg = load_job_config(ROOT / "conf" / "batch_infer.yaml",
                          _overrides(args, d / "prompts.parquet", d / "out"))
    t0 = time.perf_counter()
    job = Job(cfg)
    pool = RayPool.from_job(cfg)
    marks: dict[str, Any] = {"busy_s": 0.0}
    start, shutdown, wait = pool.start, pool.shutdown, pool.wait

    def timed_start() -> list[dict]:
        facts = start()
        marks["ready"], marks["facts"] = time.perf_counter(), facts[0]
        return facts

    def timed_shutdown() -> None:
        marks.setdefault("done", time.perf_counter())
        marks.setdefault("worker_rss", process_peak_rss_mb(marks["facts"]["pid"]))
        shutdown()

    def timed_wait() -> GroupResult:
        res = wait()
        marks["busy_s"] += res.stats.get("busy_s", 0.0)   # the engine's own time in the run
        return res

    pool.start, pool.shutdown, pool.wait = timed_start, timed_shutdown, timed_wait
    try:
        manifest = job.run(pool)
    finally:
        ray.shutdown()
    el = marks["done"] - marks["ready"]
    toks = manifest["completion_tokens"]
    assert manifest["errors"] == 0 and manifest["rows_this_run"] == len(rows), manifest
    return {"tokens_per_s": toks / el, "wall_s": el, "tokens": toks, "ttft_s": None,
            "engine_busy_s": marks["busy_s"], "start_s": marks["ready"] - t0,
            "load_s": marks["facts"]["load_s"],
            "worker_peak_rss_mb": marks["worker_rss"]}


def run_job(args: dict) -> dict:
    # A Ray cluster of its own in a private temp dir: never the machine's shared /tmp/ray.
    tmp = tempfile.mkdtemp(prefix="rbj", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    base = Path(args["out_dir"]).resolve() / "job"
    try:
        runs = {conc: best_of([_one(args, rows, base / f"rows{conc}-{i}")
                               for i, rows in enumerate(repeats)])
                for conc, repeats in args["sets"].items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first = next(iter(runs.values()))
    return {"load_s": first["load_s"], "start_s": first["start_s"],
            "peak_rss_mb": max(r["worker_peak_rss_mb"] or 0 for r in runs.values()),
            "driver_peak_rss_mb": peak_rss_mb(), "runs": runs}
