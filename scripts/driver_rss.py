#!/usr/bin/env python
"""The driver's own cost per row: its CPU time and peak RSS against the number of input rows
(the driver streams: its memory must not grow, and its CPU per row bounds a job's rows/s).

    python scripts/driver_rss.py rows=1000,100000
    python scripts/driver_rss.py rows=2000,20000 kind=chat replicas=2 \
        generation.stop='[" the"]' generation.logprobs=2

Starts a private Ray head (`ray start --head` on loopback, its own temp dir and auth token,
stopped alone), writes a tiny checkpoint and one Parquet file per row count (`kind`: mixed, as
the demo: text prompts, chat messages and token ids in turn; or text, chat, ids alone), runs
`jobs/batch_infer.py` on each with `ray.address` set to that cluster, so the driver's Ray
workers are not its children, and reads the driver's own peak RSS and CPU time (user + system,
getrusage in a fresh parent). Any `key=value` with a dot is passed to the job. Prints one line
per run, the RSS ratio of the largest to the smallest run, and the driver's CPU per row beyond
start-up (the difference of the two runs' CPU over the difference of their rows) with the rows
per second one driver core could feed at that cost.
"""
from __future__ import annotations

import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # the suite's private Ray head (tests/_ray.py)


# A fresh parent per run, so getrusage's children figures are this driver's alone.
WRAP = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print('PEAK_KB', u.ru_maxrss, 'CPU_S', u.ru_utime + u.ru_stime, file=sys.stderr);"
        " sys.exit(rc)")


def write_rows(path: Path, n: int, kind: str) -> Path:
    """n rows of one kind (text, chat, ids), or of all three in turn (mixed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from _job import MSG, TEXTS, write_prompts

    if kind == "mixed":
        return write_prompts(path, n)
    cols: dict = {"id": pa.array(range(n), pa.int64())}
    if kind == "text":
        cols["prompt"] = pa.array([f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(n)])
    elif kind == "chat":
        cols["messages"] = pa.array([[{"role": "user", "content": f"{TEXTS[i % len(TEXTS)]} "
                                       f"({i})"}] for i in range(n)], MSG)
    elif kind == "ids":
        cols["prompt_token_ids"] = pa.array([[1, 100 + i % 50, 200 + i % 70, 300]
                                             for i in range(n)], pa.list_(pa.int32()))
    else:
        raise SystemExit(f"kind={kind!r}: choose mixed, text, chat or ids")
    pq.write_table(pa.table(cols), path)
    return path


def cpu_flags() -> str:
    try:
        flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines()
                     if x.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.machine()
    return " ".join(f for f in ("avx", "avx2", "avx512f", "amx_tile") if f in flags)


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv if "." not in a.split("=", 1)[0])
    job_extra = [a for a in argv if "." in a.split("=", 1)[0]]
    counts = [int(x) for x in opts.get("rows", "1000,100000").split(",")]
    kind, replicas = opts.get("kind", "mixed"), int(opts.get("replicas", 1))
    work = Path(opts.get("workdir") or tempfile.mkdtemp(prefix="driver_rss_"))
    from _ray import private_ray_head

    from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(work / "ckpt", TinySpec(dtype="float32"))
    results: dict[int, tuple[float, float]] = {}
    print(f"driver cost: kind={kind} replicas={replicas} {' '.join(job_extra)}; CPU flags: "
          f"{cpu_flags()}; {platform.python_version()}", flush=True)
    # Token auth on, with a token of its own: the head listens on the host's network address.
    with private_ray_head(num_cpus=2, dashboard=False, auth=True) as ray_addrs:
        env = dict(ray_addrs["env"], PYTHONPATH=str(ROOT))
        for n in counts:
            data = write_rows(work / f"in-{kind}-{n}.parquet", n, kind)
            t = time.time()
            p = subprocess.run([sys.executable, "-c", WRAP, sys.executable,
                                str(ROOT / "jobs" / "batch_infer.py"),
                                f"model.path={ckpt}", f"data.input={data}",
                                f"data.output={work / f'out-{kind}-{replicas}-{n}'}",
                                "data.overwrite=true", "parallel.device=cpu",
                                f"parallel.replicas={replicas}", "generation.max_new_tokens=1",
                                "engine.block_size=16", "data.shard_rows=5000",
                                f"ray.address={ray_addrs['gcs']}", *job_extra],
                               capture_output=True, text=True, env=env, cwd=ROOT)
            if p.returncode:
                print(p.stderr[-3000:])
                return 1
            tail = p.stderr.rsplit("PEAK_KB ", 1)[1].split()
            peak_mb, cpu = int(tail[0]) / 1024, float(tail[2])
            results[n] = (peak_mb, cpu)
            print(f"{n:>8} rows: driver peak RSS {peak_mb:7.1f} MiB, CPU {cpu:7.2f} s, wall "
                  f"{time.time() - t:6.1f} s", flush=True)
    lo, hi = min(counts), max(counts)
    print(f"ratio {hi} rows / {lo} rows: {results[hi][0] / results[lo][0]:.3f}")
    if hi > lo:
        per_row = (results[hi][1] - results[lo][1]) / (hi - lo)
        print(f"driver CPU per row beyond start-up: {per_row * 1e6:.0f} us, so one driver core "
              f"feeds {1 / max(per_row, 1e-9):.0f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
