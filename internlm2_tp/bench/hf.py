"""The transformers runner: `LlamaForCausalLM.generate` on the Llama-layout conversion, batched
with left padding and a KV cache, same dtype and lengths. No prefix cache: every prompt token
is computed (the roofline counts the real prompt lengths, not the padding)."""
from __future__ import annotations

import os
import time

import torch

from internlm2_tp.bench.common import best_of, peak_rss_mb


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
    for conc, repeats in args["sets"].items():
        runs = []
        for rows in repeats:
            t = time.perf_counter()
            gen(rows, 1)
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            out = gen(rows, new)
            el = time.perf_counter() - t
            toks = len(rows) * (out.shape[1] - max(len(r) for r in rows))
            runs.append({"tokens_per_s": toks / el, "wall_s": el, "tokens": toks,
                         "ttft_s": ttft, "prefix_hits": [0] * len(rows)})
        results[conc] = best_of(runs)
    return {"load_s": load_s, "peak_rss_mb": peak_rss_mb(), "runs": results}
