"""Placing tensor-parallel groups on a Ray cluster (runtime/cluster/ray_pool.py, ray_placement.py; issue
14): CPU ranks share the cores, a group no node can hold fails at once naming its needs, and a
pending group says what it waits for until parallel.timeout_s."""
from __future__ import annotations

import time

import pytest

from _job import job_args, run_cli, write_prompts
from _ray import holding_cpus

pytestmark = pytest.mark.slow   # a Ray cluster


@pytest.mark.parametrize("tp, replicas, nodes, want", [
    (1, 1, [2.0], 2.0),            # one rank: the whole node, as before
    (4, 1, [2.0], 0.5),            # more ranks than cores: they share them
    (8, 1, [2.0], 0.25),
    (3, 1, [2.0], 0.6666),         # rounded down to Ray's precision: 3 x 0.6666 fits 2 cores
    (2, 2, [16.0, 16.0], 8.0),     # one group per node
    (4, 2, [8.0, 2.0], 1.0),       # both groups on the big node beats one group per node
    (2, 3, [4.0], 0.6666),
])
def test_cpus_per_rank(tp, replicas, nodes, want):
    from internlm2_tp.runtime.cluster.ray_placement import cpus_per_rank, groups_on

    got = cpus_per_rank(tp, replicas, nodes)
    assert got == pytest.approx(want)
    assert sum(groups_on({"CPU": n}, {"CPU": got * tp}) for n in nodes) >= replicas


def test_rank_cpus_override_and_devices():
    from internlm2_tp.runtime.cluster.ray_pool import rank_cpus

    assert rank_cpus("cpu", 4, 1, 0.5) == 0.5      # ray.cpus_per_worker wins
    assert rank_cpus("npu", 8, 1, 0.0) == 1.0      # beside a device: one core for its host thread


def test_groups_on():
    from internlm2_tp.runtime.cluster.ray_placement import groups_on

    assert groups_on({"CPU": 8, "NPU": 8}, {"CPU": 4, "NPU": 4}) == 2
    assert groups_on({"CPU": 8}, {"CPU": 4, "NPU": 4}) == 0      # no NPU on the node
    assert groups_on({"CPU": 2.0}, {"CPU": 3 * 0.6666}) == 1


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("in") / "prompts.parquet", 6)


@pytest.mark.parametrize("extra, expect", [
    (("ray.cpus_per_worker=64",), ["group (parallel.tp=1) cannot be placed", "{CPU 64}",
                                   "the largest node has {CPU 2}"]),
    (("parallel.tp=2", "parallel.device=npu"), ["{CPU 1, NPU 1}", "{CPU 2, NPU 2}",
                                                "largest node has {CPU 2, NPU 0}"]),
    (("parallel.replicas=3", "ray.cpus_per_worker=1"),
     ["parallel.replicas=3 groups cannot all be placed", "hold 2 at once"]),
])
def test_unplaceable_group_fails_at_once(extra, expect, ray_gcs, ckpt, data, tmp_path):
    """No node can ever hold the group: exit 2 within seconds, naming what it needs and the
    largest node's resources (before: parallel.timeout_s of silence, then retries)."""
    t0 = time.time()
    p = run_cli("jobs/batch_infer.py", job_args(ckpt, data, tmp_path / "out", *extra,
                                                f"ray.address={ray_gcs}"), timeout=120)
    wall = time.time() - t0
    err = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    print(*err, f"exit {p.returncode} in {wall:.1f}s", sep="\n")
    assert p.returncode == 2 and err, p.stderr[-3000:]
    assert all(e in err[0] for e in expect), err[0]
    assert "Traceback" not in p.stderr and wall < 15
    assert not list((tmp_path / "out").glob("part-*"))


def test_pending_group_says_what_it_waits_for(ray_head, ckpt, data, tmp_path):
    """The group fits the node but another driver holds its cores: a line every few seconds
    names what is pending; at parallel.timeout_s the job fails (exit 1) without retrying."""
    t0 = time.time()
    with holding_cpus(ray_head, 2):
        p = run_cli("jobs/batch_infer.py",
                    job_args(ckpt, data, tmp_path / "out", "parallel.timeout_s=8",
                             f"ray.address={ray_head['gcs']}"), timeout=120)
    wall = time.time() - t0
    pending = [x for x in p.stderr.splitlines() if "pending for" in x]
    print(*pending, p.stderr.splitlines()[-2], f"exit {p.returncode} in {wall:.1f}s", sep="\n")
    assert p.returncode == 1, p.stderr[-3000:]
    assert 2 <= len(pending) <= 4, pending   # after 1 s, then every 5 s
    assert "waiting for Ray to place 1 x {CPU 2} on one node" in pending[0]
    assert "free in the cluster now: CPU 0" in pending[0]
    failed = [x for x in p.stderr.splitlines() if x.startswith("job failed")]
    assert failed and "group 0 not placed within parallel.timeout_s=8s: other work holds what it " \
        "needs (1 x {CPU 2} on one node; free in the cluster now: CPU 0)" in failed[0], failed
    assert "retrying" not in p.stderr and "Traceback" not in p.stderr and wall < 40
