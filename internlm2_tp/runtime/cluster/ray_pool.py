"""The driver's view of `replicas` tensor-parallel groups on a Ray cluster (see ray_group.py for
one group). `wait` never blocks for good: it polls every rank's answer and each group's health,
so a dead, failed or hung rank comes back as that group's GroupFailed within parallel.timeout_s,
and it returns to Python every fraction of a second, so SIGTERM and Ctrl-C act at once.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import ray

from internlm2_tp.errors import GroupFailed, JobFailed, NodeLost, PlacementTimeout
from internlm2_tp.job_config import JobConfig
from internlm2_tp.parallel.platform import cluster_kind
from internlm2_tp.runtime.cluster.pool import GroupResult
from internlm2_tp.runtime.cluster.ray_cluster import SLICE_S, connect, worker_runtime_env
from internlm2_tp.runtime.cluster.ray_actor import device_resources
from internlm2_tp.runtime.cluster.ray_group import RayGroup
from internlm2_tp.runtime.cluster.ray_metrics import RayMetrics
from internlm2_tp.runtime.cluster.ray_nodes import node_gone
from internlm2_tp.runtime.cluster.ray_placement import check_fits, cpus_per_rank, live_nodes, shape
from internlm2_tp.runtime.data.rows import Request
from internlm2_tp.runtime.interrupts import interrupt_in
from internlm2_tp.runtime.worker import WorkerSpec

log = logging.getLogger(__name__)


def _failed(ref: Any) -> bool:
    """A ready ref holds an error (a rank's exception, a dead actor)."""
    try:
        ray.get(ref, timeout=0)
    except Exception:  # noqa: BLE001
        return True
    return False


def cluster_device(requested: str) -> str:
    """`auto` on a Ray cluster: NPU if the cluster has the resource, else GPU, else CPU."""
    return requested if requested != "auto" else cluster_kind(ray.cluster_resources())


def rank_cpus(device: str, tp: int, replicas: int, override: float) -> float:
    """CPU each rank reserves: `ray.cpus_per_worker` when set; on CPU the cores shared out over
    the ranks (fractional: 4 ranks on 2 cores reserve 0.5 each); 1 beside a device."""
    if override:
        return float(override)
    if device != "cpu":
        return 1.0
    return cpus_per_rank(tp, replicas, [n.get("CPU", 0.0) for n in live_nodes()])


class RayPool:
    """`replicas` groups fed by one driver; a group that fails at start is retried up to
    `start_retries` times (a bad checkpoint found by a rank is raised at once)."""

    poll_s = SLICE_S

    def __init__(self, base: WorkerSpec, replicas: int, device: str, cpus: float,
                 timeout_s: float, start_retries: int = 0):
        self.groups = [RayGroup(i, base, device, cpus, timeout_s) for i in range(replicas)]
        self.num_groups = replicas
        self.timeout_s = timeout_s
        self.start_retries = start_retries
        self.start_losses: list[tuple[int, NodeLost]] = []   # groups lost while first loading

    @classmethod
    def from_job(cls, cfg: JobConfig) -> RayPool:
        """Join the job's cluster (ray_cluster.connect says which) and size its groups. The
        actors of a cluster on this machine import the package this driver imported."""
        connect(cfg.ray.address, cfg.ray.connect_timeout_s, runtime_env=worker_runtime_env())
        par = cfg.parallel
        device = cluster_device(par.device)
        cpus = rank_cpus(device, par.tp, par.replicas, cfg.ray.cpus_per_worker)
        spec = WorkerSpec.from_job(cfg, device, threads=max(1, int(cpus)) if device == "cpu" else 0)
        return cls(spec, par.replicas, device, float(cpus), par.timeout_s,
                   start_retries=cfg.ray.max_group_restarts)

    def start(self) -> list[dict]:
        bundle, _ = device_resources(self.groups[0].device, self.groups[0].cpus)
        note = check_fits([bundle] * self.groups[0].base.tp, self.num_groups,
                          "a tensor-parallel group")
        if note:
            log.warning("the groups do not all fit the live nodes; waiting: %s", note)
        # Launch every group first so they load their weights in parallel.
        launched: list[Any] = []
        for g in self.groups:
            try:
                launched.append(g.launch())
            except GroupFailed as e:
                launched.append(e)
        facts = [f for g, refs in self._in_order_of_answer(launched)
                 if (f := self._await_start(g, refs)) is not None]
        while not facts:   # every group was lost with its node while loading
            res = self.wait()
            if res.rejoined:
                facts.append(self.groups[res.group].facts[0])
            elif isinstance(res.error, NodeLost):
                self.start_losses.append((res.group, res.error))
                self.replace(res.group)
            else:
                raise res.error
        return facts

    def _in_order_of_answer(self, launched: list[Any]) -> list[tuple[RayGroup, Any]]:
        """The groups in the order they answer: loaded, or failed (a rank's error, a lost node),
        so a group that fails while others load is dealt with at once. Past parallel.timeout_s
        the rest follow in order (each then waits as in await_ready)."""
        todo = {g.index: (g, refs) for g, refs in zip(self.groups, launched)}
        order = [todo.pop(i) for i, (_, refs) in list(todo.items()) if not isinstance(refs, list)]
        owner = {ref: i for i, (_, refs) in todo.items() for ref in refs}
        end = time.monotonic() + self.timeout_s
        while owner and time.monotonic() < end:
            try:
                ready, _ = ray.wait(list(owner), num_returns=1, timeout=self.poll_s,
                                    fetch_local=False)
            except Exception as e:  # noqa: BLE001 - a signal raised inside Ray's call
                intr = interrupt_in(e)
                raise intr if intr is not None else e
            for ref in ready:
                i = owner.pop(ref)
                if i in todo and (not any(x == i for x in owner.values()) or _failed(ref)):
                    order.append(todo.pop(i))
                    owner = {r: x for r, x in owner.items() if x != i}
        return order + list(todo.values())

    def _await_start(self, g: RayGroup, refs: Any) -> dict | None:
        """Rank 0's facts once group g loaded, retried up to `start_retries` times; None when
        its node went away meanwhile: a replacement is placed as for a loss mid-run, and the
        job starts with the other groups (restarts unchanged)."""
        for attempt in range(self.start_retries + 1):
            try:
                if isinstance(refs, GroupFailed):
                    raise refs
                return g.await_ready(refs)[0]
            except GroupFailed as e:
                intr = interrupt_in(e)
                if intr is not None:
                    raise intr from None
                gone = node_gone(g.node)
                if gone:
                    lost = NodeLost(f"group {g.index} lost with its node while loading: {gone} "
                                    f"({e})", node=g.node)
                    log.warning("%s; placing a replacement", lost)
                    self.start_losses.append((g.index, lost))
                    self.replace(g.index)
                    return None
                if attempt == self.start_retries or isinstance(e, PlacementTimeout):
                    raise
                log.warning("%s; retrying (%d/%d)", e, attempt + 1, self.start_retries)
                refs = self._relaunch(g)
        return None

    def placing(self) -> list[int]:
        """Groups being placed or loading again (lost with their node)."""
        return [g.index for g in self.groups if g.pending]

    @staticmethod
    def _relaunch(g: RayGroup) -> Any:
        try:
            return g.launch()
        except GroupFailed as e:
            return e

    def submit(self, g: int, requests: list[Request], return_after: int) -> None:
        self.groups[g].submit(requests, return_after)

    def wait(self) -> GroupResult:
        """The next group to answer: its finished rows and stats, the GroupFailed that failed
        it (NodeLost when its node is gone), or a replacement that is ready (`rejoined`)."""
        idle_since: float | None = None
        while True:
            owners = {ref: (g, r) for g, grp in enumerate(self.groups) for r, ref in grp.waiting()}
            placing = [g for g in self.groups if g.pending]
            if not owners and not placing:
                raise RuntimeError("RayPool.wait() with no run in flight")
            if owners:
                idle_since = None
                ready, _ = ray.wait(list(owners), num_returns=1, timeout=self.poll_s)
            else:   # every group is lost: only replacements can go on with the rows
                idle_since = idle_since or time.monotonic()
                self._no_group_left(placing, idle_since)
                ready = []
                time.sleep(self.poll_s)
            for ref in ready:
                g, rank = owners[ref]
                try:
                    out = self.groups[g].on_ready(rank, ref)
                except GroupFailed as e:
                    return self._failed(g, e)
                if out is not None:
                    return GroupResult(g, finished=out[0], stats=out[1])
            now = time.monotonic()
            for grp in placing:
                try:
                    if grp.pending_done() and grp.advance():
                        return GroupResult(grp.index, rejoined=True)
                    if grp.stalled(now):
                        raise GroupFailed(f"group {grp.index}: its replacement's ranks did not "
                                          f"start within parallel.timeout_s={self.timeout_s:g}s")
                except GroupFailed as e:
                    return self._failed(grp.index, e)
            for g, grp in enumerate(self.groups):
                try:
                    grp.check_health(now)
                except GroupFailed as e:
                    return self._failed(g, e)

    def _failed(self, g: int, e: GroupFailed) -> GroupResult:
        """Kill the failed group; its failure is NodeLost when its node is gone."""
        grp = self.groups[g]
        node = grp.node
        grp.kill()
        gone = node_gone(node) if not isinstance(e, NodeLost) else None
        if gone:
            e = NodeLost(f"group {g} lost with its node: {gone} ({e})", node=node)
        return GroupResult(g, error=e)

    def _no_group_left(self, placing: list[RayGroup], since: float) -> None:
        waited = time.monotonic() - since
        if waited <= self.timeout_s:
            return
        needs = "; ".join(f"group {g.index}: {shape(g.bundles())}" for g in placing)
        raise JobFailed(f"no tensor-parallel group is left and none could be placed within "
                        f"parallel.timeout_s={self.timeout_s:g}s (waited {waited:.0f}s for Ray "
                        f"to place {needs}); the rows done so far are saved: rerun the job when "
                        "the cluster has room")

    def replace(self, g: int) -> None:
        """Place a replacement for group g without waiting; wait() says when it is ready."""
        self.groups[g].begin_place()

    def where(self, g: int) -> dict[str, Any]:
        """The node group g runs on and each rank's visible devices, for the manifest."""
        grp = self.groups[g]
        return {"node": grp.node, "devices": list(grp.devices)}

    def metrics_sink(self, output: str) -> RayMetrics:
        return RayMetrics(output)

    def restart(self, g: int) -> dict:
        self.groups[g].kill()
        return self.groups[g].start()[0]

    def shutdown(self) -> None:
        for g in self.groups:
            g.shutdown()
