"""A rank as a Ray actor (one per device), and the small Ray helpers its group uses: bounded
gets that let signals act, the platform's resources for a rank, a rank's failure in one line."""
from __future__ import annotations

import os
from typing import Any

import ray

from internlm2_tp.parallel.group import free_port
from internlm2_tp.parallel.platform import PLATFORMS
from internlm2_tp.runtime.cluster.ray_placement import wait_all
from internlm2_tp.runtime.worker import Worker


# Ray starts worker processes at nice 15 (its worker_niceness), so a rank would yield its cores
# to every other process on the node, the job's own driver included: ranks run at nice 0.
RANK_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


def get(refs: Any, timeout_s: float) -> Any:
    """ray.get with the wait done in short slices (signals act), bounded by `timeout_s`."""
    if not wait_all(refs if isinstance(refs, list) else [refs], timeout_s):
        raise ray.exceptions.GetTimeoutError(f"not ready within {timeout_s:g}s")
    return ray.get(refs)


def device_resources(device: str, cpus: float) -> tuple[dict[str, float], dict[str, Any]]:
    """(placement bundle, actor options) for one rank: its platform's."""
    return PLATFORMS[device]().ray_resources(cpus)


@ray.remote(concurrency_groups={"health": 1})
class RankActor(Worker):
    """setup/run/shutdown run one at a time on the actor's default thread; `alive` answers on
    its own thread, even while `run` is busy."""

    def free_port(self) -> int:
        return free_port()

    def setup(self) -> dict[str, Any]:
        """The rank's facts, with where Ray put it: its node, and the visible-devices variable
        Ray set for it (ASCEND_RT_VISIBLE_DEVICES, CUDA_VISIBLE_DEVICES)."""
        facts = super().setup()
        var = PLATFORMS[self.spec.device].visible_env
        facts.update(node=ray.get_runtime_context().get_node_id(),
                     visible=os.environ.get(var) if var else None)
        return facts

    @ray.method(concurrency_group="health")
    def alive(self) -> int:
        return os.getpid()


def short_error(e: BaseException) -> str:
    """A failure in one line: a RayTaskError's cause (the rank's own exception) when it has one."""
    cause = getattr(e, "cause", None)  # RayTaskError: the rank's own exception
    e = cause if isinstance(cause, BaseException) else e
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:400] if lines else ''}"
