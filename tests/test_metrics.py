"""runtime/metrics.py and ray_metrics.py: the manifest's per-group figures and TTFT / latency
percentiles, and the same counters live on a real Ray cluster's Prometheus endpoint."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from internlm2_tp.engine.engine import Finished
from internlm2_tp.runtime.metrics import COUNTERS, PLACEMENT, JobMetrics, Quantiles


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "with_zeros"])
def test_quantiles_within_one_percent_of_the_nearest_rank(dist):
    rng = np.random.default_rng(7)
    x = {"lognormal": rng.lognormal(-2.0, 1.5, 20000), "uniform": rng.uniform(0.001, 90, 5000),
         "with_zeros": np.concatenate([np.zeros(300), rng.exponential(0.3, 700)])}[dist]
    q = Quantiles()
    for v in x:
        q.add(float(v))
    for p in (0.5, 0.9, 0.99, 0.0, 1.0):
        want = float(np.quantile(x, p, method="inverted_cdf"))   # nearest rank
        got = q.quantile(p)
        assert abs(got - want) <= 0.01 * want + 1e-12, (p, got, want)
    s = q.summary()
    assert s["rows"] == len(x) and s["p50"] <= s["p90"] <= s["p99"]
    assert len(q.buckets) < 1500   # bounded: ~1 bucket per 2% of range, whatever the row count


def test_empty_quantiles():
    assert Quantiles().summary() == {"rows": 0, "p50": None, "p90": None, "p99": None}


class Recorder:
    def __init__(self):
        self.counts, self.observed, self.inflight = [], [], []

    def count(self, group, deltas):
        self.counts.append((group, dict(deltas)))

    def observe(self, group, ttfts, latencies):
        self.observed.append((group, list(ttfts), list(latencies)))

    def in_flight(self, group, rows):
        self.inflight.append((group, rows))


def test_job_metrics_add_up_each_groups_answers():
    sink = Recorder()
    m = JobMetrics(2, sink)
    done = [Finished("a", 5, [1, 2], "stop", ttft_s=0.1, latency_s=0.3),
            Finished("b", 7, [], "error", error="too long"),
            Finished("c", 3, [4], "length", ttft_s=0.2, latency_s=0.2)]
    m.on_result(1, {"steps": 4, "tokens": 3, "busy_s": 0.5, "preemptions": 1,
                    "prefix_hit_tokens": 16, "unfinished": 2}, done)
    m.on_result(1, {"steps": 1, "tokens": 1, "busy_s": 0.25, "preemptions": 0,
                    "prefix_hit_tokens": 0}, [])
    m.on_restart(0)
    m.in_flight(0, 9)
    g0, g1 = m.manifest()["groups"]
    where = {"node": "", "devices": [], "events": []}
    assert g0 == {"group": 0, "rows": 0, "errors": 0, "prompt_tokens": 0, "tokens": 0, "steps": 0,
                  "busy_s": 0.0, "preemptions": 0, "prefix_hit_tokens": 0, "restarts": 1,
                  "node_losses": 0, "rows_lost": 0, "rows_rerun": 0, **where}
    assert g1 == {"group": 1, "rows": 3, "errors": 1, "prompt_tokens": 15, "tokens": 4, "steps": 5,
                  "busy_s": 0.75, "preemptions": 1, "prefix_hit_tokens": 16, "restarts": 0,
                  "node_losses": 0, "rows_lost": 0, "rows_rerun": 0, **where}
    # one table for manifest and exporter, beside where the group ran
    assert set(g1) - {"group"} == set(COUNTERS) | set(PLACEMENT)
    man = m.manifest()
    assert man["ttft_s"]["rows"] == 2 and man["latency_s"]["rows"] == 2   # the error row: neither
    assert man["ttft_s"]["p99"] == pytest.approx(0.2, rel=0.01)
    assert sink.observed[0] == (1, [0.1, 0.2], [0.3, 0.2]) and sink.inflight == [(0, 9)]
    assert (0, {"restarts": 1, "rows_lost": 0}) in sink.counts and sink.counts[0][1]["rows"] == 3


def test_a_failing_sink_is_dropped_not_fatal(caplog):
    class Broken(Recorder):
        def count(self, group, deltas):
            raise RuntimeError("metrics agent gone")

    m = JobMetrics(1, Broken())
    m.on_result(0, {"steps": 2}, [Finished("a", 3, [1], "stop", ttft_s=0.1, latency_s=0.1)])
    m.on_result(0, {"steps": 1}, [])
    assert m.sink is None and "metrics agent gone" in caplog.text
    assert m.manifest()["groups"][0]["steps"] == 3 and m.manifest()["ttft_s"]["rows"] == 1


def shared_prefix_prompts(path: Path, n: int) -> Path:
    """Token-id prompts sharing a 32-token prefix (prefix-cache hits), each with its own tail."""
    prefix = [1] + [100 + i for i in range(31)]
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "prompt_token_ids": pa.array(
        [prefix + [500 + 7 * i + k for k in range(3 + i % 5)] for i in range(n)],
        pa.list_(pa.int32()))}), path)
    return path


# A tight cache forces preemptions; 16 tokens per row, always (ignore_eos).
TIGHT = ["engine.block_size=4", "engine.max_num_seqs=4", "engine.max_num_batched_tokens=16",
         "engine.num_kv_blocks=24", "generation.max_new_tokens=16", "generation.ignore_eos=true"]


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(dtype="float32")


@pytest.mark.slow   # the job in-process (the torchrun path's pool: no Ray)
def test_manifest_has_group_figures_and_percentiles(ckpt, tmp_path):
    from _job import job_args, read_out, run_inprocess

    data = shared_prefix_prompts(tmp_path / "in.parquet", 12)
    m = run_inprocess(job_args(ckpt, data, tmp_path / "out", *TIGHT))
    rows = read_out(tmp_path / "out")
    [g] = m["groups"]
    assert g["rows"] == 12 == len(rows) and g["errors"] == 0 and g["restarts"] == 0
    assert g["tokens"] == 12 * 16 == m["completion_tokens"]
    assert g["prompt_tokens"] == m["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows.values())
    assert g["steps"] >= 16 and 0 < g["busy_s"] <= m["wall_s"]
    assert g["preemptions"] > 0, "the tight cache should have preempted"
    assert g["prefix_hit_tokens"] >= 32, "rows share a 32-token prefix"
    for key in ("ttft_s", "latency_s"):
        s = m[key]
        assert s["rows"] == 12 and 0 < s["p50"] <= s["p90"] <= s["p99"] <= m["wall_s"], s
    assert m["latency_s"]["p50"] >= m["ttft_s"]["p50"]
    saved = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert saved["groups"] == m["groups"] and saved["ttft_s"] == m["ttft_s"]


RUN_AND_HOLD = """import json, sys
from internlm2_tp.job_config import load_job_config
from internlm2_tp.runtime.driver import Job
from internlm2_tp.runtime.cluster.ray_cluster import disconnect
from internlm2_tp.runtime.cluster.ray_pool import RayPool
cfg = load_job_config(sys.argv[1], sys.argv[2:])
job = Job(cfg)
try:
    print(json.dumps(job.run(RayPool.from_job(cfg))), flush=True)
    sys.stdin.read()   # stay connected until the test has scraped
finally:
    disconnect()
"""
SAMPLE = re.compile(r'^(\w+)\{(.*)\} (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, output: str) -> dict[tuple[str, str], float]:
    """{(metric name, group): value} of this job's series (label output=<its URI>)."""
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        m = SAMPLE.match(line)
        if m and m.group(1).startswith("ray_internlm2_tp_"):
            labels = dict(LABEL.findall(m.group(2)))
            if labels.get("output") == output and "le" not in labels:
                out[(m.group(1), labels["group"])] = float(m.group(3))
    return out


@pytest.mark.slow   # a private Ray head with its own Prometheus endpoint
def test_live_counters_on_rays_prometheus_endpoint(ckpt, tmp_path):
    """A job on a real local Ray: while its driver is still connected, the node's metrics
    endpoint serves its counters with the manifest's values and its TTFT histogram. Ray's
    metrics agent exports what a process recorded every few seconds (its report interval, about
    5-10 s here), so the test polls, bounded at 40 s, until the values arrive."""
    from _job import job_args
    from _ray import private_ray_head
    from conftest import ROOT

    data = shared_prefix_prompts(tmp_path / "in.parquet", 8)
    out = tmp_path / "out"
    args = job_args(ckpt, data, out, *TIGHT, "parallel.replicas=2", "ray.inflight_per_group=3")
    with private_ray_head(num_cpus=2, dashboard=False, metrics=True) as head:
        env = dict(head["env"], PYTHONPATH=str(ROOT))
        p = subprocess.Popen([sys.executable, "-c", RUN_AND_HOLD, str(ROOT / "conf" / "batch_infer.yaml"),
                              *args, f"ray.address={head['gcs']}"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = p.stdout.readline()
            assert line, p.stderr.read()[-3000:]
            manifest = json.loads(line)
            want = {(f"ray_{COUNTERS[k][0]}_total", str(g["group"])): float(g[k])
                    for g in manifest["groups"] for k in COUNTERS if g[k] > 0}
            want.update({("ray_internlm2_tp_ttft_seconds_count", str(g["group"])): float(g["rows"])
                         for g in manifest["groups"] if g["rows"]})
            deadline, got = time.monotonic() + 40, {}
            while time.monotonic() < deadline:
                got = scrape(head["metrics"], manifest_output(manifest))
                if all(k in got for k in want):
                    break
                time.sleep(1)
        finally:
            p.stdin.close()
            p.wait(timeout=60)
    print(f"scraped after {40 - (deadline - time.monotonic()):.1f}s:", *sorted(got.items()), sep="\n")
    assert sum(g["rows"] for g in manifest["groups"]) == 8 and all(g["rows"] for g in manifest["groups"])
    busy = {k for k in want if "busy_seconds" in k[0]}
    assert {k: got.get(k) for k in want if k not in busy} == \
        {k: v for k, v in want.items() if k not in busy}, got
    for k in busy:   # float sums: as recorded, not as rounded in the manifest
        assert got[k] == pytest.approx(want[k], abs=2e-3)


def manifest_output(manifest: dict) -> str:
    """The output label the job used: its data.output resolved to a URI."""
    from internlm2_tp.runtime.data import storage

    return storage.resolve(manifest["config"]["data"]["output"], "data.output").uri
