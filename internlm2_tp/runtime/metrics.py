"""The job's figures: per tensor-parallel group (rows, generated tokens, engine steps, busy time,
preemptions, prefix-cache hits, restarts) and the spread of time to first token and per-row
latency, for the manifest; and, while the job runs, the same counters for a live sink (Ray's
metrics: ray_metrics.py).

The workers measure (engine.py stamps each row's TTFT and latency; worker.py reports each run's
steps, tokens, busy time, preemptions and prefix hits as deltas); the driver only adds them up.
Percentiles come from a log-bucket sketch (bounded memory whatever the row count, each estimate
within 1% of the true order statistic), not from a list of every row's time.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter as Tally
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from internlm2_tp.engine.engine import Finished

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99)
# Per-group counters: field -> (metric name, description). The manifest's `groups` entries use
# the field names; a live sink exports the metric names (Ray adds its `ray_` prefix and a
# `_total` suffix for counters).
COUNTERS: dict[str, tuple[str, str]] = {
    "rows": ("internlm2_tp_rows", "rows the group finished (row-level errors included)"),
    "errors": ("internlm2_tp_row_errors", "rows the group finished with finish_reason=error"),
    "prompt_tokens": ("internlm2_tp_prompt_tokens", "prompt tokens of the rows the group finished"),
    "tokens": ("internlm2_tp_generated_tokens", "tokens the group generated (a rerun row counts again)"),
    "steps": ("internlm2_tp_engine_steps", "engine steps (one forward over the batch each)"),
    "busy_s": ("internlm2_tp_busy_seconds", "seconds the group's rank 0 spent stepping"),
    "preemptions": ("internlm2_tp_preemptions", "sequences preempted for KV blocks (recomputed later)"),
    "prefix_hit_tokens": ("internlm2_tp_prefix_hit_tokens", "prompt tokens served from the prefix cache"),
    "restarts": ("internlm2_tp_group_restarts", "times the group was rebuilt after a failure"),
    "node_losses": ("internlm2_tp_group_node_losses",
                    "times the group was lost with its node (not counted in restarts)"),
    "rows_lost": ("internlm2_tp_rows_lost", "unfinished rows taken back from the group when it "
                  "failed or lost its node, to run again"),
    "rows_rerun": ("internlm2_tp_rows_rerun", "rows the group finished that another run lost"),
}
# Where each group ran, beside its counters in the manifest: its node (Ray's node id), each
# rank's visible-devices variable, and its history after the start: each `node_lost` and each
# `placed` again, with when (`at`, Unix time), which node, and the group's `rows` finished so far.
PLACEMENT = ("node", "devices", "events")


class Quantiles:
    """A log-bucket quantile sketch: bucket k holds values in (g^(k-1), g^k], g = (1+a)/(1-a),
    and answers with 2 g^k / (g+1), within a relative `a` of every value in the bucket."""

    def __init__(self, rel_err: float = 0.01) -> None:
        self.gamma = (1 + rel_err) / (1 - rel_err)
        self._log_gamma = math.log(self.gamma)
        self.buckets: Tally[int] = Tally()
        self.zeros = 0              # values <= 1 ns: below any time we can measure
        self.count = 0

    def add(self, x: float) -> None:
        self.count += 1
        if x <= 1e-9:
            self.zeros += 1
        else:
            self.buckets[math.ceil(math.log(x) / self._log_gamma)] += 1

    def quantile(self, q: float) -> float | None:
        """The nearest-rank q-quantile (within rel_err): the smallest value that at least a
        fraction q of the values do not exceed."""
        if not self.count:
            return None
        rank = max(0, math.ceil(round(q * self.count, 9)) - 1)   # 0-based; round: 0.07 * 100
        seen = self.zeros
        if rank < seen:
            return 0.0
        for k in sorted(self.buckets):
            seen += self.buckets[k]
            if rank < seen:
                return 2 * self.gamma ** k / (self.gamma + 1)
        raise AssertionError("unreachable: the ranks add up to count")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": self.count}
        for p in PERCENTILES:
            v = self.quantile(p / 100)
            out[f"p{p}"] = None if v is None else round(v, 6)
        return out


@dataclass
class GroupFigures:
    group: int
    rows: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    tokens: int = 0
    steps: int = 0
    busy_s: float = 0.0
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    restarts: int = 0
    node_losses: int = 0
    rows_lost: int = 0
    rows_rerun: int = 0
    node: str = ""
    devices: list = field(default_factory=list)
    events: list = field(default_factory=list)


class MetricsSink(Protocol):
    """Where live figures go while the job runs (ray_metrics.RayMetrics on a Ray cluster)."""

    def count(self, group: int, deltas: dict[str, float]) -> None: ...
    def observe(self, group: int, ttfts: list[float], latencies: list[float]) -> None: ...
    def in_flight(self, group: int, rows: int) -> None: ...


class JobMetrics:
    """Adds up each group's answers for the manifest and passes them on to the sink, if any. A
    sink that fails is dropped with a warning: monitoring never stops the job."""

    def __init__(self, num_groups: int, sink: MetricsSink | None = None) -> None:
        self.groups = [GroupFigures(g) for g in range(num_groups)]
        self.ttft, self.latency = Quantiles(), Quantiles()
        self.sink = sink

    def on_result(self, g: int, stats: dict[str, Any], finished: list[Finished]) -> None:
        """One run's answer from group g: rank 0's stats (deltas) and finished rows."""
        deltas: dict[str, float] = {k: stats.get(k, 0) for k in
                                    ("tokens", "steps", "busy_s", "preemptions", "prefix_hit_tokens")}
        deltas["rows"] = len(finished)
        deltas["errors"] = sum(f.error is not None for f in finished)
        deltas["prompt_tokens"] = sum(f.prompt_tokens for f in finished)
        ttfts = [f.ttft_s for f in finished if f.error is None and f.output_ids]
        lats = [f.latency_s for f in finished if f.error is None]
        for x in ttfts:
            self.ttft.add(x)
        for x in lats:
            self.latency.add(x)
        self._count(g, deltas)
        self._send("observe", g, ttfts, lats)

    def on_restart(self, g: int, rows_lost: int = 0) -> None:
        self._count(g, {"restarts": 1, "rows_lost": rows_lost})

    def on_node_loss(self, g: int, node: str, rows_lost: int, why: str,
                     at: float | None = None) -> None:
        self._count(g, {"node_losses": 1, "rows_lost": rows_lost})
        fig = self.groups[g]
        fig.events.append({"event": "node_lost", "node": node, "at": round(at or time.time(), 3),
                           "rows": fig.rows, "rows_lost": rows_lost, "why": why[:300]})

    def on_rerun(self, g: int, rows: int) -> None:
        self._count(g, {"rows_rerun": rows})

    def placed(self, g: int, node: str, devices: list) -> None:
        fig = self.groups[g]
        if fig.node or fig.events:   # the first placement is the job's start, not an event
            fig.events.append({"event": "placed", "node": node, "at": round(time.time(), 3),
                               "rows": fig.rows})
        fig.node, fig.devices = node, list(devices)

    def in_flight(self, g: int, rows: int) -> None:
        self._send("in_flight", g, rows)

    def _count(self, g: int, deltas: dict[str, float]) -> None:
        fig = self.groups[g]
        for k, v in deltas.items():
            setattr(fig, k, getattr(fig, k) + v)
        self._send("count", g, deltas)

    def _send(self, method: str, *args: Any) -> None:
        if self.sink is None:
            return
        try:
            getattr(self.sink, method)(*args)
        except Exception as e:  # noqa: BLE001 - the rows matter more than their metrics
            log.warning("live metrics off for the rest of the job: %s: %s", type(e).__name__, e)
            self.sink = None

    def manifest(self) -> dict[str, Any]:
        groups = [asdict(f) | {"busy_s": round(f.busy_s, 3)} for f in self.groups]
        return {"groups": groups, "ttft_s": self.ttft.summary(), "latency_s": self.latency.summary()}
