"""Which Ray node a group runs on, and whether a failed group's node is gone.

A group whose node went away has not failed by itself: the capacity is lost, not the group's
restart budget (ray.max_group_restarts). Ray marks a node dead only after its health checks fail
for a while (Ray's defaults: about 15 s), but the actors' calls fail within a couple of seconds
of a crash; so when a group fails, its node is gone if Ray already says so, or if the node's
raylet refuses connections or does not answer (its processes, or the machine, are gone), and the
job acts on it then, without waiting for Ray's verdict or for parallel.timeout_s.
"""
from __future__ import annotations

import socket
from typing import Any

import ray

PROBE_S = 2.0   # a listening port is answered by the node's kernel at once: silence means gone


def short(node_id: str) -> str:
    return node_id[:8] if node_id else "?"


def node_info(node_id: str) -> dict[str, Any] | None:
    return next((n for n in ray.nodes() if n.get("NodeID") == node_id), None)


def describe(node_id: str) -> str:
    """`node 1a2b3c4d (10.0.0.5)`, for messages."""
    info = node_info(node_id) if node_id else None
    ip = info.get("NodeManagerAddress") if info else None
    return f"node {short(node_id)}" + (f" ({ip})" if ip else "")


def node_gone(node_id: str) -> str | None:
    """Why the node is gone (a sentence), or None while it is alive and its raylet answers."""
    if not node_id:
        return None
    info = node_info(node_id)
    if info is None:
        return f"node {short(node_id)} is no longer in the cluster"
    ip, port = info.get("NodeManagerAddress"), info.get("NodeManagerPort")
    if not info.get("Alive"):
        why = (info.get("DeathReasonMessage") or "").strip().splitlines()
        return f"Ray reports node {short(node_id)} ({ip}) dead" + (f": {why[0][:200]}" if why else "")
    if not ip or not port:
        return None
    try:
        socket.create_connection((ip, int(port)), timeout=PROBE_S).close()
    except ConnectionRefusedError:
        return f"node {short(node_id)} ({ip}): its raylet refuses connections (the node's Ray is gone)"
    except OSError:
        return f"node {short(node_id)} ({ip}): its raylet did not answer within {PROBE_S:g}s"
    return None


def pg_node(pg: Any) -> str:
    """The node a placed STRICT_PACK placement group is on ('' if unknown)."""
    try:
        nodes = ray.util.placement_group_table(pg).get("bundles_to_node_id") or {}
    except Exception:  # noqa: BLE001 - a placement group already removed
        return ""
    return next(iter(nodes.values()), "") or ""
