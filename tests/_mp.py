"""Run a function on N real processes joined in a gloo group on loopback (spawned, not forked)."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

from internlm2_tp.parallel.group import free_port


def _child(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, q: Any) -> None:
    try:
        import torch

        torch.set_num_threads(1 if world > 2 else 2)
        buf = io.BytesIO()
        # plain bytes: a tensor put on the queue would be shared by fd, which dies with the child
        torch.save(fn(rank, world, port, *args), buf)
        q.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - ship any failure to the parent
        q.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300) -> list[Any]:
    """fn(rank, world, port, *args) on `world` processes; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = q.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            import torch

            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
