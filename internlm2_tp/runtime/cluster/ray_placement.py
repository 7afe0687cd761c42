"""What a Ray cluster can hold, and waiting for it in short slices.

A group is one STRICT_PACK placement group: all its bundles on one node. Before waiting on one,
`check_fits` compares what the groups need with each live node's total resources: a group that
no node can ever hold fails at once (ClusterError, exit 2) naming its needs and the best node's
resources, unless the cluster's autoscaler reports a node type that would hold it. A group that
fits but waits for resources in use gets a log line every `PENDING_LOG_S` naming what is pending.

Every wait here returns to Python every `SLICE_S`, so a SIGTERM or Ctrl-C handler runs at once.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import ray

from internlm2_tp.errors import ClusterError
from internlm2_tp.runtime.interrupts import interrupt_in
from internlm2_tp.runtime.cluster.ray_cluster import SLICE_S

log = logging.getLogger(__name__)
PENDING_LOG_S = 5.0
EPS = 1e-6


def wait_all(refs: list[Any], timeout_s: float, tick: Callable[[], None] | None = None) -> bool:
    """Wait until every ref is ready (a value or an error), in slices; False on timeout.
    `tick` runs after each slice (progress lines, health checks)."""
    end = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        left = end - time.monotonic()
        if left <= 0:
            return False
        try:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(SLICE_S, left),
                                  fetch_local=False)
        except Exception as e:  # noqa: BLE001 - a signal raised inside Ray's call
            intr = interrupt_in(e)
            raise intr if intr is not None else e
        if tick is not None and pending:
            tick()
    return True


def live_nodes() -> list[dict[str, float]]:
    """Total resources of each live node."""
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def groups_on(node: dict[str, float], need: dict[str, float]) -> int:
    """How many groups needing `need` (all on one node) the node holds when empty."""
    return min((int((node.get(k, 0.0) + EPS) // v) for k, v in need.items() if v > 0),
               default=0)


def cpus_per_rank(tp: int, replicas: int, node_cpus: list[float]) -> float:
    """The CPU share of a CPU rank: the most per rank at which every group fits on the nodes
    (cores / ranks on one node); fractional, so that a group of any tp fits a node with a core,
    its ranks then sharing the cores. At least 0.0001 (Ray's resource precision)."""
    best = 0.0
    for cpus in node_cpus:
        for k in range(1, replicas + 1):   # k groups on this node
            c = math.floor(cpus / (tp * k) * 1e4) / 1e4
            if c > best and sum(int((n + EPS) // (tp * c)) for n in node_cpus) >= replicas:
                best = c
    return max(best, 1e-4)


def _describe(res: dict[str, float], keys: list[str]) -> str:
    """`keys` (0 when absent), then whichever of CPU, GPU, NPU the node also has."""
    shown = keys + [k for k in ("CPU", "GPU", "NPU") if k in res and k not in keys]
    return ", ".join(f"{k} {res.get(k, 0.0):g}" for k in shown)


def shape(bundles: list[dict[str, float]]) -> str:
    """`n x {CPU 0.5}` and what is free of those resources in the cluster now, for messages."""
    keys = sorted(bundles[0])
    return (f"{len(bundles)} x {{{_describe(bundles[0], keys)}}} on one node; free in the "
            f"cluster now: {_describe(ray.available_resources(), keys)}")


def _autoscaler_types(need: dict[str, float]) -> list[str]:
    """Node types the cluster's autoscaler may add that would hold the group ([] when it has no
    autoscaler config, e.g. a cluster made with `ray start`)."""
    try:
        from ray._private.state import state
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a Ray without this API, or no config
        return []
    if config is None:
        return []
    return [g.name or "?" for g in config.node_group_configs
            if g.max_count != 0 and groups_on(dict(g.resources), need) >= 1]


def check_fits(bundles: list[dict[str, float]], groups: int, what: str) -> str | None:
    """Raise ClusterError when the live nodes can never hold `groups` groups of `bundles`;
    returns a note when only the autoscaler can (then waiting is worth it), else None."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    nodes = live_nodes()
    room = sum(groups_on(n, need) for n in nodes)
    if room >= groups:
        return None
    types = _autoscaler_types(need)
    if types:
        return f"the autoscaler may add a node of type {', '.join(types)}"
    keys = sorted(need)
    best = max(nodes, key=lambda n: min(n.get(k, 0.0) / v for k, v in need.items()), default={})
    shape = (f"{len(bundles)} x {{{_describe(bundles[0], keys)}}} = {{{_describe(need, keys)}}} "
             "on one node (STRICT_PACK)")
    head = (f"parallel.replicas={groups} groups cannot all be placed: each needs {shape}, and "
            f"the live nodes hold {room} at once" if groups > 1 else
            f"{what} (parallel.tp={len(bundles)}) cannot be placed: it needs {shape}")
    raise ClusterError(f"{head}; the largest node has {{{_describe(best, keys)}}} "
                       f"({len(nodes)} live node(s): {inventory(nodes, keys)}). Lower "
                       "parallel.tp or parallel.replicas, set ray.cpus_per_worker, or add a "
                       "node that has those resources")


def inventory(nodes: list[dict[str, float]], keys: list[str]) -> str:
    """The live nodes by kind, largest first: `2 x {CPU 1, NPU 2}, 1 x {CPU 0, NPU 0}`."""
    kinds: dict[str, int] = {}
    for n in sorted(nodes, key=lambda n: [-n.get(k, 0.0) for k in keys]):
        d = _describe(n, keys)
        kinds[d] = kinds.get(d, 0) + 1
    return ", ".join(f"{c} x {{{d}}}" for d, c in kinds.items())


def await_placement(pg: Any, bundles: list[dict[str, float]], what: str,
                    timeout_s: float) -> bool:
    """Wait for a placement group in slices, logging what is pending every PENDING_LOG_S and
    failing at once if the nodes that could hold it go away; False on timeout."""
    t0 = time.monotonic()
    next_log = t0 + 1.0   # a group placed at once says nothing

    def tick() -> None:
        nonlocal next_log
        now = time.monotonic()
        if now < next_log:
            return
        note = check_fits(bundles, 1, what)
        log.info("%s pending for %.0fs (parallel.timeout_s=%g): waiting for Ray to place %s%s",
                 what, now - t0, timeout_s, shape(bundles), f"; {note}" if note else "")
        next_log = now + PENDING_LOG_S
    return wait_all([pg.ready()], timeout_s, tick)
