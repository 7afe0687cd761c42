"""The job's live figures as Ray metrics (`ray.util.metrics`), recorded by the driver as each
group answers: they show on the Ray dashboard's metrics views and on every node's Prometheus
endpoint (`ray start --metrics-export-port=...`; Ray's own default is a random port, listed in
the session's `metrics_export_port`). Ray prefixes each name with `ray_` and counters with a
`_total` suffix, e.g. `ray_internlm2_tp_rows_total{output="s3://bucket/out",group="0"}`.

Labels: `output` (the job's data.output URI: one job's series apart from another's) and `group`
(the tensor-parallel group's index). Ray's metrics agent exports what a process recorded every
few seconds (its report interval), so a scrape lags the job by that much.
"""
from __future__ import annotations

from internlm2_tp.runtime.metrics import COUNTERS

TAGS = ("output", "group")
# Seconds. TTFT on a loaded device is tens of ms to seconds; a CPU or a queue of long prompts
# reaches minutes. A row's latency adds its whole decode.
TTFT_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]
LATENCY_BOUNDS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0]


class RayMetrics:
    """A MetricsSink (metrics.py) over Ray's Counter, Gauge and Histogram."""

    def __init__(self, output: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        default = {"output": output}
        self.counters = {field: Counter(name, description=desc, tag_keys=TAGS)
                         for field, (name, desc) in COUNTERS.items()}
        self.ttft = Histogram("internlm2_tp_ttft_seconds", description="time to first token per row",
                              boundaries=TTFT_BOUNDS, tag_keys=TAGS)
        self.latency = Histogram("internlm2_tp_row_latency_seconds",
                                 description="per-row latency, queued in the engine to finished",
                                 boundaries=LATENCY_BOUNDS, tag_keys=TAGS)
        self.inflight = Gauge("internlm2_tp_rows_in_flight",
                              description="rows handed to the group and not yet returned",
                              tag_keys=TAGS)
        for m in (*self.counters.values(), self.ttft, self.latency, self.inflight):
            m.set_default_tags(default)

    def count(self, group: int, deltas: dict[str, float]) -> None:
        tags = {"group": str(group)}
        for field, v in deltas.items():
            if v > 0:   # Ray's counters take positive increments only
                self.counters[field].inc(v, tags=tags)

    def observe(self, group: int, ttfts: list[float], latencies: list[float]) -> None:
        tags = {"group": str(group)}
        for x in ttfts:
            self.ttft.observe(x, tags=tags)
        for x in latencies:
            self.latency.observe(x, tags=tags)

    def in_flight(self, group: int, rows: int) -> None:
        self.inflight.set(rows, tags={"group": str(group)})
