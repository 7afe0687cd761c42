"""The driver's loop over its groups, one named step per method: `feed` a group up to its share of
rows in flight (`take` reads and prepares them), `collect` what a group returns, `recover` a group
that failed (its unfinished rows are queued again, the group rebuilt, within
ray.max_group_restarts), `put` each finished row into the shard writer exactly once. Each
group's answers and restarts are added up by `metrics` (runtime/metrics.py).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

from tqdm import tqdm

from internlm2_tp.errors import JobFailed, NodeLost
from internlm2_tp.runtime.data.input_types import InputRow
from internlm2_tp.runtime.interrupts import InterruptGuard
from internlm2_tp.runtime.metrics import JobMetrics
from internlm2_tp.runtime.data.output import OutputRow, ShardWriter
from internlm2_tp.runtime.cluster.pool import GroupResult, Pool
from internlm2_tp.runtime.data.rows import Request

log = logging.getLogger(__name__)


@dataclass
class JobStats:
    """This run's counts, as the manifest records them."""
    rows: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    group_restarts: int = 0
    node_losses: int = 0


class Dispatcher:
    def __init__(self, pool: Pool, rows: Iterator[InputRow],
                 prepare: Callable[[InputRow], Request | list[OutputRow]],
                 output: Callable[[Any], OutputRow], writer: ShardWriter, bar: tqdm,
                 guard: InterruptGuard, cap: int, max_restarts: int, t0: float,
                 metrics: JobMetrics | None = None):
        """`prepare`: a row's request (for the samples still to produce: none, nothing to do), or
        the error rows that replace them; `output`: the row of a finished sample; `cap`: rows
        in flight per group; `t0`: the job's start. A row stays in flight until its last
        sample is written; a rerun after a group failure asks for the samples still missing."""
        self.pool, self.rows, self.prepare, self.output = pool, rows, prepare, output
        self.writer, self.bar, self.guard = writer, bar, guard
        self.cap, self.return_after, self.max_restarts = cap, max(1, cap // 4), max_restarts
        self.stats = JobStats()
        self.retry: deque[Request] = deque()
        self.inflight: list[dict[Any, Request]] = [{} for _ in range(pool.num_groups)]
        self.restarts = [0] * pool.num_groups
        self.carried: dict[Any, Any] = {}   # row id -> its carried input columns, until written
        self.requeued: set[Any] = set()     # ids taken back from a failed or lost group
        self.busy: set[int] = set()         # groups with rows in flight
        self.down: set[int] = set()         # groups lost with their node, being replaced
        self.t0 = t0
        self.metrics = metrics or JobMetrics(pool.num_groups)

    def run(self) -> JobStats:
        """Until every row is written: feed each group, and answer each group that answers. A
        group lost with its node leaves its rows to the others until its replacement is ready."""
        for g, lost in getattr(self.pool, "start_losses", []):   # lost while first loading
            self.stats.node_losses += 1
            self.metrics.on_node_loss(g, lost.node, 0, str(lost), lost.at)
        self.down = set(getattr(self.pool, "placing", list)())
        for g in range(self.pool.num_groups):
            if g not in self.down:
                self.placed(g)
        self.busy = {g for g in range(self.pool.num_groups) if g not in self.down and self.feed(g)}
        while self.busy or self.retry:
            self.guard.check()
            res = self.pool.wait()
            g = res.group
            if res.error is not None:
                if not self.recover(g, res.error):
                    self.busy.discard(g)
                    self.feed_idle()
                    continue
            elif res.rejoined:
                self.down.discard(g)
                self.placed(g)
            else:
                self.collect(res)
            if self.feed(g):
                self.busy.add(g)
            else:
                self.busy.discard(g)
        return self.stats

    def placed(self, g: int) -> None:
        where = getattr(self.pool, "where", None)
        if where is not None:
            w = where(g)
            self.metrics.placed(g, w["node"], w["devices"])

    def feed_idle(self) -> None:
        """Rows came back from a lost group: the groups that ran out of work take them now."""
        for g in range(self.pool.num_groups):
            if g not in self.busy and g not in self.down and self.retry and self.feed(g):
                self.busy.add(g)

    def feed(self, g: int) -> bool:
        """Top group g up to `cap` rows in flight; False when it has none left to run."""
        new = self.take(self.cap - len(self.inflight[g]))
        self.inflight[g].update((r.row_id, r) for r in new)
        if self.inflight[g]:
            self.pool.submit(g, new, self.return_after)
        self.metrics.in_flight(g, len(self.inflight[g]))
        return bool(self.inflight[g])

    def take(self, n: int) -> list[Request]:
        """Up to n requests: rows to rerun first, then new rows (bad ones written at once)."""
        out: list[Request] = []
        while len(out) < n and self.retry:
            out.append(self.retry.popleft())
        while len(out) < n:
            row = next(self.rows, None)
            if row is None:
                break
            r = self.prepare(row)
            if isinstance(r, Request) and not r.samples:
                continue   # every sample of it is in the output already
            if row.carry is not None:
                self.carried[row.id] = row.carry
            if isinstance(r, Request):
                out.append(r)
            else:
                for i, e in enumerate(r):
                    self.put(e, last=i == len(r) - 1)
        return out

    def collect(self, res: GroupResult) -> None:
        self.metrics.on_result(res.group, res.stats, res.finished)
        inflight = self.inflight[res.group]
        for f in res.finished:
            r = inflight[f.request_id]
            left = tuple(i for i in r.samples if i != f.sample_index)
            if left:
                inflight[f.request_id] = replace(r, samples=left)
            else:
                del inflight[f.request_id]
                if self.requeued and f.request_id in self.requeued:
                    self.requeued.discard(f.request_id)
                    self.metrics.on_rerun(res.group, 1)
            self.put(self.output(f), last=not left)
        rate = self.stats.completion_tokens / max(time.time() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)

    def recover(self, g: int, cause: BaseException) -> bool:
        """Requeue the group's unfinished rows. A group lost with its node gets a replacement
        placed whenever there is room (False: the group is down until then; the others run its
        rows), without using its restart budget. Any other failure rebuilds the group now; a
        failed rebuild is one more failure, and past ray.max_group_restarts the job fails,
        naming the group and cause."""
        n = self.requeue(g)
        if isinstance(cause, NodeLost):
            self.stats.node_losses += 1
            self.metrics.on_node_loss(g, cause.node, n, str(cause), cause.at)
            log.warning("%s; its %d unfinished rows go to the other groups; placing a "
                        "replacement (restarts used: %d/%d, a lost node uses none)", cause, n,
                        self.restarts[g], self.max_restarts)
            self.down.add(g)
            self.pool.replace(g)
            return False
        lost = n
        while True:
            self.guard.check()   # a rebuild interrupted by Ctrl-C is not a group failure
            self.restarts[g] += 1
            self.stats.group_restarts += 1
            self.metrics.on_restart(g, lost)
            lost = 0
            if self.restarts[g] > self.max_restarts:
                raise JobFailed(f"group {g} failed {self.restarts[g]} times "
                                f"(ray.max_group_restarts={self.max_restarts}); last cause: {cause}")
            log.warning("group %d failed (%s); rebuilding (%d/%d), re-running its %d "
                        "unfinished rows", g, cause, self.restarts[g], self.max_restarts, n)
            try:
                self.pool.restart(g)
                self.placed(g)
                return True
            except JobFailed as e:   # the pool cannot rebuild groups (torchrun)
                raise JobFailed(f"group {g} failed: {cause}; {e}") from e
            except Exception as e:  # noqa: BLE001 - counts as another failure
                if isinstance(e, NodeLost):
                    return self.recover(g, e)
                cause = e

    def requeue(self, g: int) -> int:
        """The group's unfinished rows go first in the queue; returns how many."""
        rows = list(self.inflight[g].values())
        self.retry.extendleft(reversed(rows))
        self.requeued.update(r.row_id for r in rows)
        self.inflight[g].clear()
        self.metrics.in_flight(g, 0)
        return len(rows)

    def put(self, row: OutputRow, last: bool = True) -> None:
        """Write one output row; `last`: its input row's last sample (its carried columns go)."""
        carry = self.carried.pop(row.id, None) if last else self.carried.get(row.id)
        with self.guard.critical():   # a row is in the shard buffer (or written) exactly once
            self.writer.add(row, carry)
        s = self.stats
        s.rows += 1
        s.errors += row.finish_reason == "error"
        s.prompt_tokens += row.prompt_tokens
        s.completion_tokens += row.completion_tokens
        self.bar.update(1)
