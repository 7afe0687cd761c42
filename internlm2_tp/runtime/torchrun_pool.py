"""One tensor-parallel group made of torchrun's ranks: rank 0 drives (reads, schedules rows,
writes), every rank runs the same engine calls, which rank 0 broadcasts over a CPU channel."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

from internlm2_tp.runtime.rows import Request
from internlm2_tp.runtime.worker import Worker


class TorchrunPool:
    num_groups = 1

    def __init__(self, worker: Worker, ctrl_group: Any = None):
        self.worker = worker
        self.world = worker.spec.tp
        self.ctrl = ctrl_group
        self._result: tuple[int, Any, dict] | None = None

    def _bcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]

    # rank 0 ----------------------------------------------------------------------------------
    def go(self) -> None:
        self._bcast(("go", None))

    def abort(self, why: str) -> None:
        self._bcast(("abort", why))

    def start(self) -> list[dict]:
        return [self.worker.setup()]

    def submit(self, g: int, requests: list[Request], return_after: int) -> None:
        self._bcast(("run", (requests, return_after)))
        try:
            finished, stats = self.worker.run(requests, return_after)
            self._result = (0, finished, stats)
        except Exception as e:  # noqa: BLE001 - reported to the driver as a group failure
            self._result = (0, e, {})

    def wait(self) -> tuple[int, Any, dict]:
        assert self._result is not None
        r, self._result = self._result, None
        return r

    def restart(self, g: int) -> dict:
        from internlm2_tp.runtime.driver import JobFailed
        raise JobFailed("a rank failed; torchrun cannot rebuild its group: rerun the same command "
                        "to resume (finished rows are saved)")

    def shutdown(self) -> None:
        try:
            self._bcast(("stop", None))
        finally:
            self.worker.shutdown()


def follow(pool: TorchrunPool) -> int:
    """Ranks > 0: wait for rank 0's verdict, load, then mirror rank 0's engine calls."""
    kind, payload = pool._bcast(None)
    if kind == "abort":
        return 2
    pool.worker.setup()
    try:
        while True:
            kind, payload = pool._bcast(None)
            if kind != "run":
                return 0
            pool.worker.run(*payload)
    finally:
        pool.worker.shutdown()
