#!/usr/bin/env python
"""Peak extra memory of the plain attention path (CPU) for one step over the paged cache.

    python scripts/attention_memory.py                      # 256 rows x 4096 keys, 20B at tp=2
    python scripts/attention_memory.py --old /tmp/main_attention.py   # and an older attention.py
    python scripts/attention_memory.py --rows 1 --context 200000 --chunk 2048 --heads 8 \
        --kv-heads 4 --head-dim 16 --dtype float32      # a prefill chunk after 200k cached keys

With --chunk N each row is a prefill chunk of N new tokens continuing `context` cached keys
(the issue-26 test model's share at tp=2 with the flags above) instead of a decode.

One layer's cache holds rows x context keys (bf16, 24 q heads over 4 KV heads of 128: the 20B's
share at tp=2); every row decodes one token. Printed: the peak RSS above the RSS just before the
call (the kernel's VmHWM watermark, reset first), next to that layer's share of the KV cache.
--old FILE measures an attention.py of the old API (main before the platform layer: module
functions paged_attention / AttentionMetadata) the same way. Each measurement runs in a fresh
process in which glibc returns large blocks when they are freed (MALLOC_MMAP_THRESHOLD_), after
a small warm-up call, so the figure is this call's own transient memory.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def step(rows: int, ctx: int, h: int, kvh: int, seed: int = 0, chunk: int = 0, d: int = 128,
         dtype: str = "bfloat16"):
    """Host lists and tensors of a step, row r owning blocks [r*nb, (r+1)*nb): each row
    decodes one token after ctx - 1 keys, or (chunk > 0) prefills chunk tokens after ctx."""
    import torch

    new = chunk or 1
    total = ctx + new if chunk else ctx
    bs, nb, dt = 128, -(-total // 128), getattr(torch, dtype)
    g = torch.Generator().manual_seed(seed)
    cache = [torch.empty(rows * nb, bs, kvh, d, dtype=dt).normal_(generator=g)
             for _ in range(2)]
    q, k, v = (torch.randn(rows * new, n, d, generator=g).to(dt) for n in (h, kvh, kvh))
    pos = list(range(total - new, total))
    lists = dict(positions=pos * rows, rope_lengths=[total] * (rows * new),
                 slots=[r * nb * bs + p for r in range(rows) for p in pos],
                 block_tables=[list(range(r * nb, (r + 1) * nb)) for r in range(rows)],
                 context_lens=[total] * rows, query_lens=[new] * rows)
    return lists, (q, k, v), cache


def run_new(lists: dict, qkv, cache, heads: int):
    import torch

    from internlm2_tp.attention import AttentionMetadata, TorchAttention

    meta = AttentionMetadata.build(**lists, logits_indices=None, device=torch.device("cpu"),
                                   num_decodes=sum(n == 1 for n in lists["query_lens"]))
    backend = TorchAttention()
    backend.prepare(meta, cache[0], heads)
    return backend.forward(*qkv, (cache[0], cache[1]), meta, qkv[0].shape[-1] ** -0.5)


def run_old(path: str, lists: dict, qkv, cache, heads: int):
    import torch

    spec = importlib.util.spec_from_file_location("old_attention", path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_attention"] = old          # dataclasses look their module up
    spec.loader.exec_module(old)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    ctx = lists["context_lens"]
    meta = old.AttentionMetadata(
        positions=t(lists["positions"]), rope_lengths=t(lists["rope_lengths"]),
        slot_mapping=t(lists["slots"]), block_tables=t(lists["block_tables"]),
        context_lens=t(ctx), query_lens=t(lists["query_lens"]), logits_indices=None,
        num_decodes=len(ctx), max_decode_context=max(ctx), max_prefill_query=0,
        max_prefill_context=0)
    return old.paged_attention(*qkv, cache[0], cache[1], meta, 128 ** -0.5)


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    run = (lambda *a: run_old(args.old, *a)) if args.old else run_new
    shape = dict(chunk=args.chunk, d=args.head_dim, dtype=args.dtype)
    run(*step(1, 300, args.heads, args.kv_heads, seed=1, **shape), args.heads)   # warm-up
    lists, qkv, cache = step(args.rows, args.context, args.heads, args.kv_heads, **shape)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                    # reset the peak-RSS watermark
    before = status_kib("VmRSS")
    out = run(lists, qkv, cache, args.heads)
    peak = status_kib("VmHWM")
    layer = sum(c.numel() * c.element_size() for c in cache)
    print(json.dumps({"peak_extra": (peak - before) * 1024, "layer_kv": layer,
                      "out": float(out.float().abs().mean())}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--chunk", type=int, default=0, help="prefill N tokens after the context")
    ap.add_argument("--old", default="", help="an attention.py of the old API to measure too")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONPATH=str(ROOT))
    base = [sys.executable, __file__, "--child", f"--rows={args.rows}",
            f"--context={args.context}", f"--heads={args.heads}", f"--kv-heads={args.kv_heads}",
            f"--head-dim={args.head_dim}", f"--dtype={args.dtype}", f"--chunk={args.chunk}"]
    what = f"prefill chunks of {args.chunk} after" if args.chunk else "decode step:"
    print(f"{what} {args.rows} rows x {args.context} keys, {args.heads} q / "
          f"{args.kv_heads} KV heads x {args.head_dim}, {args.dtype}, one layer")
    runs = [("now", [])] + ([("old", [f"--old={args.old}"])] if args.old else [])
    for name, extra in runs:
        r = json.loads(subprocess.run(base + extra, env=env, check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1])
        print(f"  {name:4} peak extra {r['peak_extra'] / 2**20:8.1f} MiB = "
              f"{r['peak_extra'] / r['layer_kv']:6.1%} of the layer's KV cache "
              f"({r['layer_kv'] / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
