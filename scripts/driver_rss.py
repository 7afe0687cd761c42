#!/usr/bin/env python
"""Driver peak RSS against the number of input rows (the driver streams; it must not grow).

    python scripts/driver_rss.py rows=1000,100000

Starts a private Ray head (`ray start --head` on loopback, its own temp dir and auth token,
stopped alone), writes a tiny checkpoint and one Parquet file per row count (text prompts, chat
messages and token ids, like the demo), runs `jobs/batch_infer.py` on each with `ray.address`
set to that cluster, so the driver's Ray workers are not its children, and reads the driver's
own peak RSS (getrusage in a fresh parent). Prints one line per run and the ratio of the largest
to the smallest.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))   # the suite's private Ray head (tests/_ray.py)


# A fresh parent per run, so getrusage's children maximum is this driver's alone.
WRAP = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
        " sys.exit(rc)")


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv)
    counts = [int(x) for x in opts.get("rows", "1000,100000").split(",")]
    work = Path(opts.get("workdir") or tempfile.mkdtemp(prefix="driver_rss_"))
    from _job import write_prompts  # the tests' demo-style prompts
    from _ray import private_ray_head

    from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(work / "ckpt", TinySpec(dtype="float32"))
    results = {}
    # Token auth on, with a token of its own: the head listens on the host's network address.
    with private_ray_head(num_cpus=2, dashboard=False, auth=True) as ray_addrs:
        env = dict(ray_addrs["env"], PYTHONPATH=str(ROOT))
        for n in counts:
            data = write_prompts(work / f"in-{n}.parquet", n)
            t = time.time()
            p = subprocess.run([sys.executable, "-c", WRAP, sys.executable,
                                str(ROOT / "jobs" / "batch_infer.py"),
                                f"model.path={ckpt}", f"data.input={data}",
                                f"data.output={work / f'out-{n}'}", "parallel.device=cpu",
                                "generation.max_new_tokens=1", "engine.block_size=16",
                                "data.shard_rows=5000", f"ray.address={ray_addrs['gcs']}"],
                               capture_output=True, text=True, env=env, cwd=ROOT)
            if p.returncode:
                print(p.stderr[-3000:])
                return 1
            peak = int(p.stderr.rsplit("PEAK_KB ", 1)[1].split()[0])
            results[n] = peak / 1024
            print(f"{n:>8} rows: driver peak RSS {peak / 1024:7.1f} MiB, {time.time() - t:6.1f} s",
                  flush=True)
    lo, hi = min(counts), max(counts)
    print(f"ratio {hi} rows / {lo} rows: {results[hi] / results[lo]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
