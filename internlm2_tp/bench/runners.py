"""Benchmark runners: our engine, transformers `generate`, and (optionally) vLLM, each measured
in its own fresh process on the same checkpoint and prompts, so peak RSS is per process and the
machine's noise is shared by all.

`python -m internlm2_tp.bench RUNNER ARGS.json` (bench/__main__.py) runs one measurement and prints
one JSON line.
"""
from __future__ import annotations

import os
import queue
import resource
import time
from pathlib import Path
from typing import Any

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_prompts(n: int, lo: int, hi: int, shared_frac: float, prefix_len: int, vocab: int,
                 seed: int) -> list[list[int]]:
    """n token-id prompts of lengths in [lo, hi]; the first shared_frac of them start with the
    same prefix_len-token system prompt."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab - 100, (prefix_len,), generator=g).tolist()
    out = []
    for i in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        body = torch.randint(3, vocab - 100, (length,), generator=g).tolist()
        p = ([1] + prefix + body)[:max(length, prefix_len + 8)] if i < shared_frac * n else [1] + body
        out.append(p[:hi] if len(p) > hi else p)
    return out


def flops_per_token(cfg: Any) -> float:
    """Matmul FLOPs per generated token (weights only; attention over short contexts ignored)."""
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d * h
    per_layer = qkv + cfg.num_attention_heads * d * h + 3 * h * f
    return 2.0 * (cfg.num_hidden_layers * per_layer + cfg.vocab_size * h)


def matmul_peak_gflops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def read_files_s(ckpt: str) -> float:
    """Time to read every weight file once (page cache warm, as the loader then sees it)."""
    files = [p for p in Path(ckpt).iterdir() if p.suffix in (".safetensors", ".bin")]
    t = time.perf_counter()
    for p in files:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - t


# -- our engine ----------------------------------------------------------------------------------
def _ours_rank(rank: int, args: dict, port: int, q: Any) -> None:
    from internlm2_tp.engine.engine import EngineConfig
    from internlm2_tp.engine.sampler import SamplingParams
    from internlm2_tp.runtime.rows import Request
    from internlm2_tp.runtime.worker import Worker, WorkerSpec

    tp = args["tp"]
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // tp))
    read_files_s(args["ckpt"])  # warm the page cache like every other runner
    spec = WorkerSpec(model_path=args["ckpt"], dtype=args["dtype"], device="cpu", tp=tp, rank=rank,
                      master_addr="127.0.0.1", master_port=port,
                      engine=EngineConfig(**args.get("engine", {})))
    w = Worker(spec)
    t0 = time.perf_counter()
    facts = w.setup()
    setup_s = time.perf_counter() - t0       # + the KV cache allocation and engine start
    load_s = facts["load_s"]                 # group, config, weights read and laid out
    params = SamplingParams(max_new_tokens=args["new_tokens"], ignore_eos=True)
    w.run([Request(f"w{i}", p, params) for i, p in enumerate(args["warmup"])], 4)  # warm-up
    results = {}
    for conc, rows in args["sets"].items():  # a fresh prompt set per run: no cross-run cache hits
        reqs = [Request(i, p, params) for i, p in enumerate(rows)]
        t = time.perf_counter()
        done, _ = w.run(reqs, len(reqs))   # return when every row is done
        el = time.perf_counter() - t
        if rank == 0:
            toks = sum(len(f.output_ids) for f in done)
            results[conc] = {"tokens_per_s": toks / el, "wall_s": el, "tokens": toks,
                             "ttft_s": sum(f.ttft_s for f in done) / len(done)}
    w.shutdown()
    q.put((rank, {"load_s": load_s, "setup_s": setup_s, "peak_rss_mb": peak_rss_mb(),
                  "runs": results}))


def run_ours(args: dict) -> dict:
    import multiprocessing as mp

    from internlm2_tp.parallel.group import free_port

    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_ours_rank, args=(r, args, port, q)) for r in range(args["tp"])]
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


# -- transformers ----------------------------------------------------------------------------------
def run_hf(args: dict) -> dict:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 2)
    dtype = getattr(torch, args["dtype"])
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(args["llama_ckpt"], dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    new = args["new_tokens"]

    def batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)  # left padding, as generate expects
        ids = torch.tensor([[2] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    def gen(rows: list[list[int]], n: int) -> torch.Tensor:
        ids, mask = batch(rows)
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=2)

    gen(args["warmup"], 2)  # warm-up
    results = {}
    for conc, rows in args["sets"].items():
        t = time.perf_counter()
        gen(rows, 1)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = gen(rows, new)
        el = time.perf_counter() - t
        toks = len(rows) * (out.shape[1] - max(len(r) for r in rows))
        results[conc] = {"tokens_per_s": toks / el, "wall_s": el, "tokens": toks, "ttft_s": ttft}
    return {"load_s": load_s, "peak_rss_mb": peak_rss_mb(), "runs": results}


RUNNERS = {"ours": run_ours, "hf": run_hf}
