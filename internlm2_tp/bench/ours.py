"""Our engine's benchmark runner: one process per rank, the job's own Worker, warm-up excluded.
Each run reports what the engine computed (engine.work), for the roofline."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from dataclasses import asdict, replace
from typing import Any

from internlm2_tp.bench.common import best_of, peak_rss_mb, read_files_s


def _rank(rank: int, args: dict, port: int, q: Any) -> None:
    from internlm2_tp.engine.engine import EngineConfig
    from internlm2_tp.engine.sampler import SamplingParams
    from internlm2_tp.runtime.data.rows import Request
    from internlm2_tp.runtime.worker import Worker, WorkerSpec

    tp = args["tp"]
    read_files_s(args["ckpt"])  # warm the page cache like every other runner
    spec = WorkerSpec(model_path=args["ckpt"], dtype=args["dtype"], device="cpu", tp=tp,
                      rank=rank, master_addr="127.0.0.1", master_port=port,
                      engine=EngineConfig(**args.get("engine", {})),
                      threads=max(1, (os.cpu_count() or 2) // tp))
    w = Worker(spec)
    t0 = time.perf_counter()
    facts = w.setup()
    setup_s = time.perf_counter() - t0       # + the KV cache allocation and engine start
    load_s = facts["load_s"]                 # group, config, weights read and laid out
    params = SamplingParams(max_new_tokens=args["new_tokens"], ignore_eos=True)
    w.run([Request(f"w{i}", p, params) for i, p in enumerate(args["warmup"])], 4)  # warm-up
    eng = w.engine
    assert eng is not None
    counts = hasattr(eng, "work")   # an engine that counts its work (older ones: estimated)
    results = {}
    for conc, repeats in args["sets"].items():  # fresh prompts per run: no cross-run cache hits
        runs = []
        for rows in repeats:
            reqs = [Request(i, p, params) for i, p in enumerate(rows)]
            work0 = replace(eng.work) if counts else None
            t = time.perf_counter()
            done, stats = w.run(reqs, len(reqs))   # return when every row is done
            el = time.perf_counter() - t
            toks = sum(len(f.output_ids) for f in done) if rank == 0 else 0
            runs.append({"tokens_per_s": toks / el, "wall_s": el, "tokens": toks,
                         "ttft_s": sum(f.ttft_s for f in done) / len(done) if rank == 0 else 0,
                         "steps": stats["steps"], "preemptions": stats["preemptions"]})
            if work0 is not None:
                runs[-1]["work"] = asdict(eng.work.minus(work0))
        results[conc] = best_of(runs)
    w.shutdown()
    q.put((rank, {"load_s": load_s, "setup_s": setup_s, "peak_rss_mb": peak_rss_mb(),
                  "dtype": facts["dtype"], "runs": results}))


def run_ours(args: dict) -> dict:
    from internlm2_tp.parallel.group import free_port

    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, args, port, q)) for r in range(args["tp"])]
    for p in procs:
        p.start()
    got: dict = {}
    while len(got) < len(procs):  # a rank that dies (OOM, crash) must not hang the benchmark
        try:
            rank, res = q.get(timeout=5)
            got[rank] = res
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"our engine's rank(s) {dead} died (exit codes "
                                   f"{[procs[r].exitcode for r in dead]})")
    for p in procs:
        p.join()
    out = got[0]
    out["peak_rss_mb_ranks"] = [got[r]["peak_rss_mb"] for r in sorted(got)]
    out["read_files_s"] = read_files_s(args["ckpt"])
    return out
