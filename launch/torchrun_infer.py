#!/usr/bin/env python
"""The batch job without Ray: `torchrun --nproc-per-node N launch/torchrun_infer.py key=value ...`.

tp = N (one tensor-parallel group). Rank 0 validates the job, reads Parquet and writes the output
exactly as the Ray path does; every rank runs the same engine loop. A failed rank ends the job;
rerunning the same command resumes where it stopped.
"""
from __future__ import annotations

import datetime
import os
import sys
import threading
from pathlib import Path
from typing import Any

from internlm2_tp.cli import main_guard

ROOT = Path(__file__).resolve().parents[1]   # the checkout: conf/


def main(argv: list[str]) -> int:
    from internlm2_tp.errors import JobConfigError
    from internlm2_tp.job_config import load_job_config
    from internlm2_tp.parallel.platform import get_platform
    from internlm2_tp.runtime.driver import Job
    from internlm2_tp.runtime.cluster.torchrun_pool import TorchrunPool, follow
    from internlm2_tp.runtime.worker import Worker, WorkerSpec

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cfg = load_job_config(ROOT / "conf" / "batch_infer.yaml", argv)
    if any(a.startswith("parallel.tp=") for a in argv) and cfg.parallel.tp != world:
        raise JobConfigError(f"parallel.tp={cfg.parallel.tp} but torchrun started {world} ranks "
                             "(tp is --nproc-per-node under torchrun)")
    if cfg.parallel.replicas != 1:
        raise JobConfigError("parallel.replicas must be 1 under torchrun (use Ray for replicas)")
    cfg.parallel.tp = world
    platform = get_platform(cfg.parallel.device)
    if platform.backend == "gloo" and os.environ.get("MASTER_ADDR", "127.0.0.1") in (
            "127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctrl = rendezvous(platform.backend, cfg.parallel.timeout_s) if world > 1 else None
    spec = WorkerSpec.from_job(cfg, platform.kind, rank=rank, master_addr="env", local_index=local)
    worker = Worker(spec)
    pool = TorchrunPool(worker, ctrl)
    if rank != 0:
        return follow(pool)
    try:
        job = Job(cfg)  # validation before any weight is read; followers wait for the verdict
    except BaseException as e:
        pool.abort(f"rank 0: {e}")
        raise
    pool.go()
    manifest = job.run(pool)
    print(f"rows={manifest['rows_this_run']} errors={manifest['errors']} "
          f"output_tokens_per_s={manifest['output_tokens_per_s']} output={cfg.data.output}")
    return 0


def rendezvous(backend: str, timeout_s: float) -> Any:
    """Join the ranks (bounded by parallel.timeout_s) and make the control channel: a gloo
    group of its own, so that commands never interleave with the model's collectives. The
    joining runs on a helper thread while this one waits in slices: Ctrl-C acts at once."""
    import torch.distributed as dist
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            dist.init_process_group(backend, init_method="env://",
                                    timeout=datetime.timedelta(seconds=timeout_s))
            box["ctrl"] = dist.new_group(backend="gloo")
        except BaseException as e:  # noqa: BLE001 - raised on the main thread
            box["error"] = e
    t = threading.Thread(target=run, name="rendezvous", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.25)
    if "error" in box:
        raise box["error"]
    return box["ctrl"]


if __name__ == "__main__":
    sys.exit(main_guard(main, sys.argv[1:]))
