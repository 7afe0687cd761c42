"""Killed drivers and workers lose no row and duplicate none (issues 4 and 7)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from _job import job_args, read_out, run_inprocess, write_prompts
from conftest import ROOT

ROWS = 240
FAST = ("generation.max_new_tokens=8", "data.shard_rows=20", "engine.max_num_seqs=16",
        "ray.address=auto")


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("in") / "prompts.parquet", ROWS)


@pytest.fixture(scope="module")
def reference(ckpt, data, tmp_path_factory):
    """An uninterrupted run (one in-process rank)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    run_inprocess(job_args(ckpt, data, out, *FAST[:-1]))
    return {k: r["completion_token_ids"] for k, r in read_out(out).items()}


def start_job(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "batch_infer.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)


def wait_for_parts(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if len(list(out.glob("part-*.parquet"))) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"job ended (rc {proc.returncode}) before {n} shards:\n"
                        f"{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {n} shards within {timeout}s")


def rank_actor_pids() -> list[int]:
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::RankActor"):
            pids.append(p.info["pid"])
    return pids


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def test_sigkill_driver_then_rerun_resumes_exactly_once(ray_cluster, ckpt, data, reference, tmp_path):
    out = tmp_path / "out"
    args = job_args(ckpt, data, out, *FAST)
    proc = start_job(args)
    wait_for_parts(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_out(out))
    assert 0 < done_before < ROWS, "the kill should land mid-run"
    finish(start_job(args))
    got = read_out(out)
    assert {k: r["completion_token_ids"] for k, r in got.items()} == reference


def test_sigkill_worker_actor_group_rebuilt(ray_cluster, ckpt, data, reference, tmp_path):
    out = tmp_path / "out"
    proc = start_job(job_args(ckpt, data, out, *FAST, "parallel.tp=2"))
    wait_for_parts(out, 1, proc)
    pids = rank_actor_pids()
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)
    log = finish(proc)
    assert "rebuilding" in log
    got = read_out(out)
    assert {k: r["completion_token_ids"] for k, r in got.items()} == reference
