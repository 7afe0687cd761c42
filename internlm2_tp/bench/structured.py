"""Throughput with structured output beside the same rows without it (issue 24's target: a
loss of at most 10% at 64 and 256 rows).

    python -m internlm2_tp.bench.structured [ckpt=DIR] [rows=64,256] [new_tokens=48] [repeats=2]

One in-process rank (the job's Worker, tp 1, fp32) on the benchmark's checkpoint shape
(bench/suite.py: hidden 1536, 4 layers, the 92544-token vocabulary; written under
/tmp/internlm2_tp-bench when ckpt is not given). The constrained rows follow a JSON array of
grammar_libs.EXTRACT objects (at least 64), so every row of both runs emits exactly new_tokens tokens; the
runs alternate, and each keeps its best repeat. Prints one JSON object: output tok/s of each,
their ratio, and the CPU flags.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

SPEC = dict(hidden_size=1536, num_attention_heads=48, num_key_value_heads=8,
            intermediate_size=4096, num_hidden_layers=4, dtype="float32", vocab_size=92544)


def _checkpoint(path: str | None) -> str:
    from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint

    out = Path(path or "/tmp/internlm2_tp-bench/ckpt-structured")
    if not (out / "config.json").is_file():
        write_tiny_checkpoint(out, TinySpec(**SPEC))
    return str(out)


def _run(worker: Any, prompts: list[list[int]], params: Any) -> tuple[float, int]:
    from internlm2_tp.runtime.data.rows import Request

    reqs = [Request(i, p, params) for i, p in enumerate(prompts)]
    t = time.perf_counter()
    done, _ = worker.run(reqs, len(reqs))
    return time.perf_counter() - t, sum(len(f.output_ids) for f in done)


def main(argv: list[str]) -> dict[str, Any]:
    from internlm2_tp.bench.common import make_prompts
    from internlm2_tp.bench.grammar_libs import EXTRACT
    from internlm2_tp.engine.config import EngineConfig
    from internlm2_tp.engine.params import SamplingParams
    from internlm2_tp.parallel.group import free_port
    from internlm2_tp.runtime.worker import Worker, WorkerSpec

    args = dict(a.split("=", 1) for a in argv)
    rows = [int(r) for r in args.get("rows", "64,256").split(",")]
    new, repeats = int(args.get("new_tokens", "48")), int(args.get("repeats", "2"))
    ckpt = _checkpoint(args.get("ckpt"))
    w = Worker(WorkerSpec(model_path=ckpt, dtype="float32", device="cpu", tp=1, rank=0,
                          master_addr="127.0.0.1", master_port=free_port(),
                          engine=EngineConfig(max_num_seqs=max(rows)), need_tokenizer=True))
    w.setup()
    plain = SamplingParams(max_new_tokens=new, ignore_eos=True)
    schema = SamplingParams(max_new_tokens=new, json_schema=json.dumps(
        {"type": "array", "items": EXTRACT, "minItems": 64}))   # longer than new_tokens
    _run(w, make_prompts(8, 16, 32, 0, 0, 92544, seed=99), schema)        # warm-up, both paths
    flags = set(open("/proc/cpuinfo").read().split())
    report: dict[str, Any] = {"checkpoint": SPEC, "new_tokens": new, "cpu_flags": sorted(
        f for f in flags if f.startswith(("avx", "amx"))), "rows": {}}
    for n in rows:
        best = {"plain": 0.0, "json_schema": 0.0}
        for rep in range(repeats):
            prompts = make_prompts(n, 16, 48, 0, 0, 92544, seed=rep)
            order = [("plain", plain), ("json_schema", schema)]
            for name, params in order if rep % 2 == 0 else order[::-1]:
                wall, toks = _run(w, prompts, params)
                assert toks == n * new, f"{name}: {toks} tokens, expected {n * new}"
                best[name] = max(best[name], toks / wall)
        report["rows"][n] = {"plain_tok_s": round(best["plain"], 1),
                             "json_schema_tok_s": round(best["json_schema"], 1),
                             "ratio": round(best["json_schema"] / best["plain"], 3)}
    w.shutdown()
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
