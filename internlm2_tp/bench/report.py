"""The benchmark's table, ratios and targets, printed and written as JSON.

Per engine and run: output tok/s; the roofline bound of that run (roofline.py: the FLOPs it
executed, weights streamed at least once per generated token, against the matmul peak and the
streaming-read bandwidth measured in the same benchmark run) and the achieved fraction of it;
"weights-only util", the old "util" column: output tok/s x the weight FLOPs of one generated
token over the matmul peak (it ignores prefill, attention and memory bandwidth); "gemm ceil":
the share of the roofline the run's matmuls alone reach at their own shapes (roofline.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from internlm2_tp.bench.roofline import (Machine, RunWork, Shape, gemm_seconds, prefix_hits,
                                         run_work)

# (name, engine, baseline engine or None for the roofline fraction, rows, minimum)
TARGETS = [
    *((f"ours tp1 / vLLM at {c} rows", "ours_tp1", "vllm", c, 1.15) for c in (16, 64, 256)),
    ("ours tp1 share of roofline at 256 rows", "ours_tp1", None, 256, 0.75),
    ("ours tp1 share of roofline at 64 rows", "ours_tp1", None, 64, 0.65),
    *((f"tp2 / tp1 at {c} rows", "ours_tp2", "ours_tp1", c, 0.95) for c in (64, 256)),
    ("job / engine (tp1) at 256 rows", "job_tp1", "ours_tp1", 256, 0.90),
]


def run_bound(engine: str, run: dict, prompts: list[list[int]], cfg: Any, shape: Shape,
              machine: Machine) -> dict[str, Any]:
    """The roofline of one engine's run: the work it executed (our engine counts its own;
    peers' from their prefix-cache hits), weights streamed once per generated token."""
    if "work" in run:
        work = replace(RunWork(**run["work"]), forwards=cfg.new_tokens)
    else:
        hits = run.get("prefix_hits") or prefix_hits(prompts, cfg.block_size)
        work = run_work([len(p) for p in prompts], hits, cfg.new_tokens)
    return machine.bound(work, shape, run["tokens"])


def summarize(cfg: Any, suite: dict[str, Any]) -> dict[str, Any]:
    shape, results, sets = suite["shape"], suite["results"], suite["sets"]
    m = suite["machine"]
    machine = Machine(max(x.matmul_peak_gflops for x in m), max(x.stream_read_gbs for x in m))
    per_tok = shape.weight_flops_per_output_token()
    for engine, r in results.items():
        for conc, run in r["runs"].items():
            b = run_bound(engine, run, sets[int(conc)][run.get("repeat", 0)], cfg, shape,
                          machine)
            run["roofline"] = b
            run["roofline_fraction"] = run["tokens_per_s"] / b["bound_tokens_per_s"]
            run["weights_only_util"] = run["tokens_per_s"] * per_tok / (machine.matmul_peak_gflops * 1e9)
            if "gemm" in suite:
                gemm_s = gemm_seconds(RunWork(**b["work"]), shape, suite["gemm"], int(conc),
                                      cfg.new_tokens, suite["prefill_rows"])
                run["gemm_ceiling"] = run["tokens"] / b["bound_tokens_per_s"] / gemm_s
    head = _tps(results, "ours_tp1", cfg.rows)
    ratios = {f"ours_tp1_vs_{e}": head / _tps(results, e, cfg.rows) for e in results
              if e != "ours_tp1" and head and _tps(results, e, cfg.rows)}
    o = results.get("ours_tp1", {})
    if "read_files_s" in o:
        ratios["load_vs_file_read"] = o["load_s"] / max(o["read_files_s"], 1e-9)
    return {"machine": asdict(machine), "machine_measurements": [asdict(x) for x in m],
            "gemm_rates": asdict(suite["gemm"]) if "gemm" in suite else None,
            "shape": asdict(shape), "weight_flops_per_output_token": per_tok,
            "config": asdict(cfg), "engines": results, "ratios": ratios,
            "targets": targets(results)}


def _tps(results: dict, engine: str, rows: int) -> float | None:
    run = results.get(engine, {}).get("runs", {}).get(str(rows))
    return None if run is None else run["tokens_per_s"]


def targets(results: dict) -> list[dict[str, Any]]:
    out = []
    for name, engine, base, rows, minimum in TARGETS:
        if base is None:
            run = results.get(engine, {}).get("runs", {}).get(str(rows))
            value = None if run is None else run["roofline_fraction"]
        else:
            a, b = _tps(results, engine, rows), _tps(results, base, rows)
            value = None if a is None or b is None else a / b
        if value is not None:
            out.append({"target": name, "value": value, "minimum": minimum,
                        "met": value >= minimum})
    return out


def print_report(summary: dict[str, Any], dtype: str) -> None:
    m = summary["machine"]
    print(f"\n{dtype}: matmul peak {m['matmul_peak_gflops']:.0f} GFLOP/s, streaming read "
          f"{m['stream_read_gbs']:.1f} GB/s (best of the start and end of this run); "
          f"{summary['weight_flops_per_output_token'] / 1e6:.0f} MFLOP of weights per output "
          f"token\n")
    print(f"{'engine':13} {'rows':>5} {'tok/s':>8} {'TTFT s':>7} {'roofline':>9} {'by':>7} "
          f"{'of roof':>8} {'gemm ceil':>9} {'wt-only':>8} {'vs tp1':>7} {'peak RSS MB':>11} "
          f"{'load s':>7}")
    engines = summary["engines"]
    for e, r in engines.items():
        for conc, run in sorted(r["runs"].items(), key=lambda kv: int(kv[0])):
            base = _tps(engines, "ours_tp1", int(conc))
            vs = f"{run['tokens_per_s'] / base:7.2f}" if base else f"{'-':>7}"
            ttft = f"{run['ttft_s']:7.2f}" if run.get("ttft_s") is not None else f"{'-':>7}"
            b = run["roofline"]
            ceil = f"{run['gemm_ceiling']:9.1%}" if "gemm_ceiling" in run else f"{'-':>9}"
            print(f"{e:13} {conc:>5} {run['tokens_per_s']:8.1f} {ttft} "
                  f"{b['bound_tokens_per_s']:9.0f} {b['bound_by']:>7} "
                  f"{run['roofline_fraction']:8.1%} {ceil} {run['weights_only_util']:8.1%} "
                  f"{vs} {r['peak_rss_mb']:11.0f} {r['load_s']:7.2f}")
    print("\nroofline: the run's executed FLOPs and weight/KV bytes against the peak and "
          "bandwidth above; gemm ceil: the share of that roofline the run's matmuls alone reach "
          "at their own shapes (nothing else executed); wt-only: the old 'util' (weight FLOPs "
          "of output tokens only)")
    if summary.get("gemm_rates"):
        g = summary["gemm_rates"]
        print("GEMM GFLOP/s at M rows, layers: " + ", ".join(
            f"{k}: {v:.0f}" for k, v in g["layers"].items()) + "; LM head: " + ", ".join(
            f"{k}: {v:.0f}" for k, v in g["head"].items()))
    print(f"\nat {summary['config']['rows']} rows: " + ", ".join(
        f"{k} {v:.2f}" for k, v in summary["ratios"].items()))
    if summary["targets"]:
        print("\ntargets (same run):")
    for t in summary["targets"]:
        print(f"  {t['target']:40} {t['value']:6.2f}  (>= {t['minimum']:.2f}: "
              f"{'met' if t['met'] else 'MISSED'})")


def write_report(cfg: Any, suite: dict[str, Any], out: Path) -> dict[str, Any]:
    summary = summarize(cfg, suite)
    print_report(summary, cfg.dtype)
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {out / 'benchmark.json'}")
    return summary
