"""One tensor-parallel group made of torchrun's ranks: rank 0 drives (reads, schedules rows,
writes), every rank runs the same engine calls, which rank 0 broadcasts over a CPU channel.

The channel is a gloo group of its own (never the model's collectives), and its waits poll, so
a rank waiting for the next command still acts on SIGTERM / Ctrl-C at once. A rank 0 stopped
in the middle of a run leaves the others inside the model's collectives: it does not send them
"stop" (they could not receive it); they end with rank 0's exit, or by torchrun.
"""
from __future__ import annotations

import pickle
import time
from typing import Any

import torch
import torch.distributed as dist

from internlm2_tp.errors import JobFailed
from internlm2_tp.runtime.cluster.pool import GroupResult
from internlm2_tp.runtime.data.rows import Request
from internlm2_tp.runtime.worker import Worker


class TorchrunPool:
    num_groups = 1

    def __init__(self, worker: Worker, ctrl_group: Any = None):
        self.worker = worker
        self.world = worker.spec.tp
        self.ctrl = ctrl_group
        self._result: GroupResult | None = None
        self._busy = False   # rank 0 is inside a run the others mirror

    def _bcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the others pass None)."""
        if self.world == 1:
            return obj
        root = self.worker.spec.rank == 0
        data = pickle.dumps(obj) if root else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        _poll(dist.broadcast(size, src=0, group=self.ctrl, async_op=True))
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if root
               else torch.empty(int(size.item()), dtype=torch.uint8))
        _poll(dist.broadcast(buf, src=0, group=self.ctrl, async_op=True))
        return obj if root else pickle.loads(buf.numpy().tobytes())

    # rank 0 ----------------------------------------------------------------------------------
    def go(self) -> None:
        self._bcast(("go", None))

    def abort(self, why: str) -> None:
        self._bcast(("abort", why))

    def start(self) -> list[dict]:
        return [self.worker.setup()]

    def submit(self, g: int, requests: list[Request], return_after: int) -> None:
        self._busy = True    # until the run is over on rank 0 (a signal may cut it short)
        self._bcast(("run", (requests, return_after)))
        try:
            finished, stats = self.worker.run(requests, return_after)
            self._result = GroupResult(0, finished=finished, stats=stats)
        except Exception as e:  # noqa: BLE001 - reported to the driver as a group failure
            self._result = GroupResult(0, error=e)
        self._busy = False

    def wait(self) -> GroupResult:
        assert self._result is not None
        r, self._result = self._result, None
        return r

    def metrics_sink(self, output: str) -> None:
        return None   # no Ray: the manifest has the figures

    def restart(self, g: int) -> dict:
        raise JobFailed("a rank failed; torchrun cannot rebuild its group: rerun the same command "
                        "to resume (finished rows are saved)")

    def shutdown(self) -> None:
        try:
            if not self._busy:
                self._bcast(("stop", None))
        finally:
            self.worker.shutdown()


def _poll(work: Any) -> None:
    """Wait for an async collective while returning to Python, so signal handlers run."""
    while not work.is_completed():
        time.sleep(0.01)
    work.wait()   # raises the collective's error, if any


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
