"""One tensor-parallel group as Ray actors, one actor per device.

Each group gets a STRICT_PACK placement group (one bundle per rank, so a group never spans
nodes): bundles {"NPU": 1} on Ascend (the actor asks for the resource too, so Ray sets
ASCEND_RT_VISIBLE_DEVICES and the actor's device is logical npu:0), {"GPU": 1} on CUDA, CPU
bundles on CPU. Rendezvous is on loopback inside the node; the backend is the device's
(hccl / nccl / gloo), bounded by parallel.timeout_s (and HCCL_* on Ascend).

Nothing the group waits on is unbounded, and no wait is long: every wait is bounded by
parallel.timeout_s and returns to Python every fraction of a second (ray_placement.wait_all),
so SIGTERM and Ctrl-C act at once. A group no node can hold fails before any wait (exit 2); a
pending one logs what it waits for. While a run is in flight each rank answers a health check on
its own thread (the `health` concurrency group), so a rank that is stopped, hung outside a
collective, or dead is noticed within parallel.timeout_s.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from internlm2_tp.errors import GroupFailed, PlacementTimeout, UserError
from internlm2_tp.parallel.platform import PLATFORMS
from internlm2_tp.runtime.cluster.ray_actor import (RANK_RUNTIME_ENV, RankActor, device_resources,
                                                    get, short_error)
from internlm2_tp.runtime.cluster.ray_nodes import describe, pg_node
from internlm2_tp.runtime.cluster.ray_placement import await_placement, check_fits, shape, wait_all
from internlm2_tp.runtime.data.rows import Request
from internlm2_tp.runtime.worker import WorkerSpec, digest

log = logging.getLogger(__name__)


class RayGroup:
    def __init__(self, index: int, base: WorkerSpec, device: str, cpus: float, timeout_s: float):
        self.index, self.base, self.device, self.cpus = index, base, device, cpus
        self.timeout_s = timeout_s
        self.health_every_s = min(10.0, timeout_s / 3)
        self.actors: list[Any] = []
        self.pg = None
        self.pids: list[int] = []
        self.ready = False                 # every rank loaded its shard
        self.refs: list[Any] = []          # the run in flight: one ref per rank
        self.digests: dict[int, str] = {}  # ranks > 0 that already answered this run
        self.ping: tuple[list[Any], float] | None = None
        self.last_ok = 0.0
        self.node = ""                     # the node id Ray placed the group on
        self.devices: list[str | None] = []   # each rank's visible-devices variable
        self.facts: list[dict] = []        # each rank's, once loaded
        self.pending: list[Any] = []       # a replacement's step in progress (placing, loading)
        self.stage = ""                    # which: "" placing, port, master, loading
        self.pending_since = 0.0

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> list[dict]:
        return self.await_ready(self.launch())

    def bundles(self) -> list[dict[str, float]]:
        bundle, _ = device_resources(self.device, self.cpus)
        return [dict(bundle) for _ in range(self.base.tp)]

    def launch(self) -> list[Any]:
        """Place the group, create its actors and start loading; returns the setup refs."""
        bundles = self.bundles()
        what = f"group {self.index}"
        note = check_fits(bundles, 1, what)   # ClusterError (exit 2) if no node can hold it
        if note:
            log.warning("%s does not fit any live node; waiting: %s", what, note)
        self.pg = placement_group(bundles, strategy="STRICT_PACK", name="")
        if not await_placement(self.pg, bundles, what, self.timeout_s):
            self.kill()
            raise PlacementTimeout(f"{what} not placed within parallel.timeout_s="
                                   f"{self.timeout_s:g}s: other work holds what it needs ("
                                   f"{shape(bundles)})")
        return self._spawn()

    def begin_place(self) -> None:
        """Ask Ray to place the group and return at once (a replacement for a group lost with its
        node, placed whenever a node has room: now, or when one joins); `advance` moves it on."""
        self.kill()
        self.pg = placement_group(self.bundles(), strategy="STRICT_PACK", name="")
        self.pending, self.pending_since = [self.pg.ready()], time.monotonic()

    def advance(self) -> bool:
        """The replacement's step in progress is done; start the next without waiting: placed
        -> actors starting -> rendezvous set -> loading -> ready (True). Failures are
        GroupFailed, as in start()."""
        refs, self.pending, self.pending_since = self.pending, [], time.monotonic()
        if not self.actors:                     # placed
            self._create_actors()
            self.pending = [self.actors[0].free_port.remote()]
        elif self.stage == "port":              # rank 0's actor is up: its port for the group
            port = self._settle(refs)[0]
            self.pending = [a.set_master.remote("127.0.0.1", port) for a in self.actors]
        elif self.stage == "master":
            self._settle(refs)
            log.info("group %d: %d rank(s) up, loading", self.index, self.base.tp)
            self.pending = [a.setup.remote() for a in self.actors]
        else:
            self.await_ready(refs)
            self.stage = ""
            return True
        self.stage = {"": "port", "port": "master", "master": "loading"}[self.stage]
        return False

    def stalled(self, now: float) -> bool:
        """A replacement's actors took longer than parallel.timeout_s to start or load (waiting
        to be placed has no limit while other groups run)."""
        return bool(self.pending and self.actors and now - self.pending_since > self.timeout_s)

    def _settle(self, refs: list[Any]) -> list[Any]:
        try:
            return ray.get(refs)
        except Exception as e:  # noqa: BLE001
            self.kill()
            raise GroupFailed(f"group {self.index}: actors did not start: {short_error(e)}") from e

    def pending_done(self) -> bool:
        if not self.pending:
            return False
        ready, _ = ray.wait(self.pending, num_returns=len(self.pending), timeout=0,
                            fetch_local=False)
        return len(ready) == len(self.pending)

    def _create_actors(self) -> None:
        _, opts = device_resources(self.device, self.cpus)
        self.node = pg_node(self.pg)
        log.info("group %d placed: starting %d rank(s) on %s", self.index, self.base.tp,
                 describe(self.node))
        self.actors = [
            RankActor.options(**opts, max_restarts=0, runtime_env=RANK_RUNTIME_ENV,
                              scheduling_strategy=
                              PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r)
                              ).remote(replace(self.base, rank=r))
            for r in range(self.base.tp)]

    def _spawn(self) -> list[Any]:
        """The placed group's actors, their rendezvous, and their setup refs."""
        self._create_actors()
        try:
            port = get(self.actors[0].free_port.remote(), self.timeout_s)
            # Every actor of the group is on one node (STRICT_PACK): rendezvous over loopback.
            get([a.set_master.remote("127.0.0.1", port) for a in self.actors], self.timeout_s)
        except Exception as e:  # noqa: BLE001
            self.kill()
            raise GroupFailed(f"group {self.index}: actors did not start: {short_error(e)}") from e
        log.info("group %d: %d rank(s) up, loading", self.index, self.base.tp)
        return [a.setup.remote() for a in self.actors]

    def await_ready(self, refs: list[Any]) -> list[dict]:
        """Rank facts once every rank loaded its shard. A bad checkpoint found by a rank is
        re-raised as itself (a user error); anything else is GroupFailed."""
        try:
            facts = get(refs, self.timeout_s)
        except Exception as e:  # noqa: BLE001
            self.kill()
            cause = getattr(e, "cause", None)
            if isinstance(cause, UserError):
                raise cause from None
            raise GroupFailed(f"group {self.index}: start failed: {short_error(e)}") from e
        self.pids = [f["pid"] for f in facts]
        self.facts = facts
        self.node = facts[0].get("node") or self.node
        self.devices = [f.get("visible") for f in facts]
        self.last_ok = time.monotonic()
        self.ready = True
        var = PLATFORMS[self.device].visible_env
        log.info("group %d ready: %d rank(s), pids %s, on %s%s", self.index, len(facts),
                 self.pids, describe(self.node), f", {var} {self.devices}" if var else "")
        return facts

    def kill(self) -> None:
        """Kill the actors (a stopped or hung process too) and free the placement group."""
        self.refs, self.digests, self.ping, self.ready = [], {}, None, False
        self.pending, self.stage = [], ""
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
        """Leave the process group cleanly when loaded and idle, then kill: nothing is left
        running. (A rank still loading is killed at once: its actor runs one call at a time.)"""
        if self.actors and self.ready and not self.refs:
            try:
                get([a.shutdown.remote() for a in self.actors], min(10.0, self.timeout_s))
            except Exception:  # noqa: BLE001 - killed below anyway
                pass
        self.kill()

    # -- one run ----------------------------------------------------------------------------------
    def submit(self, requests: list[Request], return_after: int) -> None:
        self.refs = [a.run.remote(requests, return_after) for a in self.actors]
        self.digests = {}
        self.last_ok = time.monotonic()

    def waiting(self) -> list[tuple[int, Any]]:
        """(rank, ref) of the ranks whose answer to the run in flight is still awaited."""
        return [(r, ref) for r, ref in enumerate(self.refs) if r not in self.digests]

    def on_ready(self, rank: int, ref: Any) -> tuple[list, dict] | None:
        """A rank answered: rank 0 completes the run (the others' digests must match, within
        the timeout); another rank's digest is kept, or its error fails the group."""
        try:
            if rank:
                self.digests[rank] = get(ref, self.timeout_s)[0]
                return None
            finished, stats = get(ref, self.timeout_s)
            rest = [(r, x) for r, x in enumerate(self.refs[1:], 1) if r not in self.digests]
            got = get([x for _, x in rest], self.timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            raise GroupFailed(f"group {self.index}: rank(s) did not finish the step within "
                              f"parallel.timeout_s={self.timeout_s:.0f}s") from e
        except Exception as e:  # noqa: BLE001 - actor death, a rank's exception
            why = short_error(e)
            if "timed out" in why.lower() or "timeout" in why.lower():
                why += self._timeout_hint()
            raise GroupFailed(f"group {self.index} rank {rank}: {why}") from e
        self.digests.update((r, d) for (r, _), (d, _) in zip(rest, got))
        mine = digest(finished)
        bad = sorted(r for r, d in self.digests.items() if d != mine)
        self.refs, self.digests, self.ping = [], {}, None
        if bad:
            raise GroupFailed(f"group {self.index}: ranks {bad} disagree with rank 0")
        return finished, stats

    def _timeout_hint(self) -> str:
        """A rank's collective timed out: say which setting bounds it and which ranks are silent
        (a stopped or hung rank leaves the others waiting in the collective)."""
        refs = [a.alive.remote() for a in self.actors]
        wait_all(refs, min(3.0, self.timeout_s))
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        silent = [r for r, x in enumerate(refs) if x not in ready]
        who = (f"; rank(s) {silent} (pids {[self.pids[r] for r in silent if r < len(self.pids)]})"
               " do not answer: hung or stopped" if silent else "")
        return f" (collectives wait at most parallel.timeout_s={self.timeout_s:.0f}s{who})"

    def check_health(self, now: float) -> None:
        """While a run is in flight, ping every rank now and then; a rank that has not answered
        within parallel.timeout_s (stopped, hung, or dead) fails the group."""
        if not self.refs:
            return
        if self.ping is None:
            if now - self.last_ok >= self.health_every_s:
                self.ping = ([a.alive.remote() for a in self.actors], now)
            return
        refs, sent = self.ping
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(ready) == len(refs):
            try:
                ray.get(refs)   # all ready: an answer or an error
            except Exception as e:  # noqa: BLE001
                raise GroupFailed(f"group {self.index}: health check failed: {short_error(e)}") from e
            self.ping, self.last_ok = None, now
        elif now - sent > self.timeout_s:
            silent = [r for r, x in enumerate(refs) if x not in ready]
            raise GroupFailed(f"group {self.index}: rank(s) {silent} (pids "
                              f"{[self.pids[r] for r in silent if r < len(self.pids)]}) did not "
                              f"answer a health check within parallel.timeout_s="
                              f"{self.timeout_s:.0f}s (hung or stopped)")
