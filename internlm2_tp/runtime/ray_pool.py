"""Tensor-parallel groups as Ray actors, one actor per device.

Each group gets a STRICT_PACK placement group (one bundle per rank, so a group never spans
nodes): bundles {"NPU": 1} on Ascend (the actor asks for the resource too, so Ray sets
ASCEND_RT_VISIBLE_DEVICES and the actor's device is logical npu:0), {"GPU": 1} on CUDA, CPU
bundles on CPU. Rendezvous is on loopback inside the node; the backend is the device's
(hccl / nccl / gloo).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from internlm2_tp.parallel.device import free_port
from internlm2_tp.runtime.rows import Request
from internlm2_tp.runtime.worker import Worker, WorkerSpec

log = logging.getLogger(__name__)


class GroupFailed(RuntimeError):
    """A rank of a group died or failed; the group must be rebuilt."""


def device_resources(device: str, cpus: float) -> tuple[dict[str, float], dict[str, Any]]:
    """(placement bundle, actor options) for one rank."""
    if device == "npu":
        return {"CPU": cpus, "NPU": 1}, {"num_cpus": cpus, "resources": {"NPU": 1}}
    if device == "cuda":
        return {"CPU": cpus, "GPU": 1}, {"num_cpus": cpus, "num_gpus": 1}
    return {"CPU": cpus}, {"num_cpus": cpus}


def cluster_device(requested: str) -> str:
    """`auto` on a Ray cluster: NPU if the cluster has the resource, else GPU, else CPU."""
    if requested != "auto":
        return requested
    res = ray.cluster_resources()
    return "npu" if res.get("NPU") else "cuda" if res.get("GPU") else "cpu"


@ray.remote
class RankActor(Worker):
    def free_port(self) -> int:
        return free_port()


class RayGroup:
    def __init__(self, index: int, base: WorkerSpec, device: str, cpus: float):
        self.index, self.base, self.device, self.cpus = index, base, device, cpus
        self.actors: list[Any] = []
        self.pg = None
        self.others: list[Any] = []

    def start(self, timeout_s: float) -> list[dict]:
        return self.await_ready(self.launch(timeout_s), timeout_s)

    def launch(self, timeout_s: float) -> list[Any]:
        """Place the group, create its actors and start loading; returns the setup refs."""
        bundle, opts = device_resources(self.device, self.cpus)
        self.pg = placement_group([dict(bundle) for _ in range(self.base.tp)],
                                  strategy="STRICT_PACK", name="")
        ready = self.pg.ready()
        done, _ = ray.wait([ready], timeout=timeout_s)
        if not done:
            self.kill()
            raise GroupFailed(f"group {self.index}: Ray could not place {self.base.tp} x {bundle} "
                              f"on one node within {timeout_s:.0f}s (cluster resources: "
                              f"{ray.cluster_resources()})")
        self.actors = [
            RankActor.options(**opts, max_restarts=0, scheduling_strategy=
                              PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)
                              ).remote(replace(self.base, rank=r))
            for r in range(self.base.tp)]
        port = ray.get(self.actors[0].free_port.remote(), timeout=timeout_s)
        # Every actor of the group is on one node (STRICT_PACK): rendezvous over loopback.
        ray.get([a.set_master.remote("127.0.0.1", port) for a in self.actors], timeout=timeout_s)
        return [a.setup.remote() for a in self.actors]

    def await_ready(self, refs: list[Any], timeout_s: float) -> list[dict]:
        try:
            return ray.get(refs, timeout=timeout_s)
        except Exception as e:
            self.kill()
            raise GroupFailed(f"group {self.index}: start failed: {e}") from e

    def submit(self, requests: list[Request], return_after: int) -> Any:
        refs = [a.run.remote(requests, return_after) for a in self.actors]
        self.others = refs[1:]
        return refs[0]

    def collect(self, ref: Any, timeout_s: float) -> tuple[list, dict]:
        from internlm2_tp.runtime.worker import digest
        try:
            finished, stats = ray.get(ref)
            digests = ray.get(self.others, timeout=timeout_s)
        except Exception as e:  # actor death, task error, or a hung rank
            raise GroupFailed(f"group {self.index}: {type(e).__name__}: {str(e)[:500]}") from e
        mine = digest(finished)
        bad = [i + 1 for i, (d, _) in enumerate(digests) if d != mine]
        if bad:
            raise GroupFailed(f"group {self.index}: ranks {bad} disagree with rank 0")
        return finished, stats

    def pids(self) -> list[int]:
        return ray.get([a.ping.remote() for a in self.actors])

    def kill(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        self.actors = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:  # noqa: BLE001
                pass
            self.pg = None

    def shutdown(self) -> None:
        try:
            ray.get([a.shutdown.remote() for a in self.actors], timeout=30)
        except Exception:  # noqa: BLE001 - killed below anyway
            pass
        self.kill()


class RayPool:
    """The driver's view of `replicas` tensor-parallel groups on a Ray cluster."""

    def __init__(self, base: WorkerSpec, replicas: int, device: str, cpus: float,
                 timeout_s: float):
        self.groups = [RayGroup(i, base, device, cpus) for i in range(replicas)]
        self.num_groups = replicas
        self.timeout_s = timeout_s
        self.pending: dict[Any, int] = {}

    def start(self) -> list[dict]:
        # Launch every group first so they load their weights in parallel.
        refs = [g.launch(self.timeout_s) for g in self.groups]
        return [g.await_ready(r, self.timeout_s)[0] for g, r in zip(self.groups, refs)]

    def submit(self, g: int, requests: list[Request], return_after: int) -> None:
        self.pending[self.groups[g].submit(requests, return_after)] = g

    def wait(self) -> tuple[int, Any, dict]:
        ready, _ = ray.wait(list(self.pending), num_returns=1)
        g = self.pending.pop(ready[0])
        try:
            finished, stats = self.groups[g].collect(ready[0], self.timeout_s)
        except GroupFailed as e:
            return g, e, {}
        return g, finished, stats

    def restart(self, g: int) -> dict:
        self.groups[g].kill()
        return self.groups[g].start(self.timeout_s)[0]

    def shutdown(self) -> None:
        for g in self.groups:
            g.shutdown()
