"""The driver's view of `replicas` tensor-parallel groups on a Ray cluster (see ray_group.py for
one group). `wait` never blocks for good: it polls every rank's answer and each group's health,
so a dead, failed or hung rank comes back as that group's GroupFailed within parallel.timeout_s.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import ray

from internlm2_tp.parallel.platform import cluster_kind
from internlm2_tp.runtime.ray_group import GroupFailed, RankActor, RayGroup, device_resources
from internlm2_tp.runtime.rows import Request
from internlm2_tp.runtime.worker import WorkerSpec

__all__ = ["GroupFailed", "RankActor", "RayGroup", "RayPool", "cluster_device",
           "device_resources"]
log = logging.getLogger(__name__)


def cluster_device(requested: str) -> str:
    """`auto` on a Ray cluster: NPU if the cluster has the resource, else GPU, else CPU."""
    return requested if requested != "auto" else cluster_kind(ray.cluster_resources())


class RayPool:
    """`replicas` groups fed by one driver; a group that fails at start is retried up to
    `start_retries` times (a bad checkpoint found by a rank is raised at once)."""

    poll_s = 1.0

    def __init__(self, base: WorkerSpec, replicas: int, device: str, cpus: float,
                 timeout_s: float, start_retries: int = 0):
        self.groups = [RayGroup(i, base, device, cpus, timeout_s) for i in range(replicas)]
        self.num_groups = replicas
        self.timeout_s = timeout_s
        self.start_retries = start_retries

    def start(self) -> list[dict]:
        # Launch every group first so they load their weights in parallel.
        launched: list[Any] = []
        for g in self.groups:
            try:
                launched.append(g.launch())
            except GroupFailed as e:
                launched.append(e)
        facts = []
        for g, refs in zip(self.groups, launched):
            for attempt in range(self.start_retries + 1):
                try:
                    if isinstance(refs, GroupFailed):
                        raise refs
                    facts.append(g.await_ready(refs)[0])
                    break
                except GroupFailed as e:
                    if attempt == self.start_retries:
                        raise
                    log.warning("%s; retrying (%d/%d)", e, attempt + 1, self.start_retries)
                    refs = self._relaunch(g)
        return facts

    @staticmethod
    def _relaunch(g: RayGroup) -> Any:
        try:
            return g.launch()
        except GroupFailed as e:
            return e

    def submit(self, g: int, requests: list[Request], return_after: int) -> None:
        self.groups[g].submit(requests, return_after)

    def wait(self) -> tuple[int, Any, dict]:
        """The next group to answer: (group, finished rows, stats) or (group, GroupFailed, {})."""
        while True:
            owners = {ref: (g, r) for g, grp in enumerate(self.groups) for r, ref in grp.waiting()}
            if not owners:
                raise RuntimeError("RayPool.wait() with no run in flight")
            ready, _ = ray.wait(list(owners), num_returns=1, timeout=self.poll_s)
            for ref in ready:
                g, rank = owners[ref]
                try:
                    out = self.groups[g].on_ready(rank, ref)
                except GroupFailed as e:
                    self.groups[g].kill()
                    return g, e, {}
                if out is not None:
                    return g, out[0], out[1]
            now = time.monotonic()
            for g, grp in enumerate(self.groups):
                try:
                    grp.check_health(now)
                except GroupFailed as e:
                    grp.kill()
                    return g, e, {}

    def restart(self, g: int) -> dict:
        self.groups[g].kill()
        return self.groups[g].start()[0]

    def shutdown(self) -> None:
        for g in self.groups:
            g.shutdown()
