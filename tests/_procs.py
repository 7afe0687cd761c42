"""Helpers for tests that run the batch job as a process and stop it: starting, waiting for
shards, and finding what is left running afterwards (psutil)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from conftest import ROOT

_started: list[subprocess.Popen] = []


def kill_stray_jobs() -> None:
    """Kill the jobs a test started and left running (a test that failed half-way)."""
    while _started:
        p = _started.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def start_job(args: list[str], new_session: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    p = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "batch_infer.py"), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         cwd=ROOT, start_new_session=new_session)
    _started.append(p)
    return p


def start_inprocess(args: list[str]) -> subprocess.Popen:
    """The job with one in-process rank (_job.run_inprocess: no Ray) in a process of its own,
    to be killed mid-run."""
    code = ("import sys; sys.path.insert(0, 'tests'); from _job import run_inprocess; "
            f"run_inprocess({args!r})")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _started.append(p)
    return p


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


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def is_rank_actor(p: psutil.Process | int) -> bool:
    try:
        p = psutil.Process(p) if isinstance(p, int) else p
        return " ".join(p.cmdline()).startswith("ray::RankActor")
    except psutil.Error:
        return False


def cluster_rank_actors(gcs: str) -> list[int]:
    """RankActor processes of the Ray cluster at `gcs` (children of its raylet)."""
    pids = []
    port = gcs.rsplit(":", 1)[1]  # the raylet names the GCS by the node's address, not ours
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("raylet") and any(
                a.startswith("--gcs-address=") and a.endswith(f":{port}") for a in cmd):
            pids += [c.pid for c in p.children() if is_rank_actor(c)]
    return pids


def alive(pids: list[int], wait_s: float = 30) -> list[int]:
    """The pids still running (zombies do not count) after waiting up to `wait_s`."""
    end = time.time() + wait_s
    while True:
        left = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not left or time.time() > end:
            return left
        time.sleep(0.2)


def in_group(pgid: int) -> list[int]:
    """Processes (not zombies) of the process group `pgid`."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def assert_whole_shards(out: Path, total: int) -> int:
    """Only our files, no temp file, no manifest (the job did not finish), every shard whole;
    returns the rows saved (some, not all: the job was stopped mid-run)."""
    names = sorted(p.name for p in out.iterdir())
    assert all(n == "_job.json" or (n.startswith("part-") and n.endswith(".parquet"))
               for n in names), names
    rows = sum(pq.read_table(out / n).num_rows for n in names if n.startswith("part-"))
    assert 0 < rows < total, "the signal should land mid-run"
    return rows
