"""What every benchmark runner shares: the prompt set, peak memory, the page-cache warm-up."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_peak_rss_mb(pid: int) -> float | None:
    """Another process's peak RSS so far (VmHWM); None when it is gone or unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def best_of(runs: list[dict]) -> dict:
    """The fastest of a run's repeats (a burst of another process on a shared machine only
    ever slows a run down), with every repeat's tok/s and which one it was."""
    i = max(range(len(runs)), key=lambda j: runs[j]["tokens_per_s"])
    return dict(runs[i], repeat=i, all_tokens_per_s=[r["tokens_per_s"] for r in runs])


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


def read_files_s(ckpt: str) -> float:
    """Time to read every weight file once (page cache warm, as the loader then sees it)."""
    files = [p for p in Path(ckpt).iterdir() if p.suffix in (".safetensors", ".bin")]
    t = time.perf_counter()
    for p in files:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - t
