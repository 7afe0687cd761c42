"""Finding and joining the job's Ray cluster (runtime/cluster/ray_cluster.py; issue 14).

Where the cluster comes from; a cluster that is gone, silent or refusing ends the job with exit 2
within a bounded time, naming the address, how it was found and what to set, without a traceback.
Then Ray's defaults, isolated in a private HOME and RAY_TMPDIR (tests/_ray.py), none of it with
the suite-wide RAY_AUTH_MODE=disabled: `ray start --head` with a Ray token (token auth on), the
job with no ray.* setting finds it and runs tp 4 and 8 on 2 cores token-exact against tp 1,
`ray job submit` to it uploads only the project (not a .venv), a job without the token is
refused, and the fault-injection command starts its own cluster with token auth and passes.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from _job import job_args, read_out, run_inprocess, write_prompts
from _ray import RAY_VARS, ray_defaults_head
from conftest import ROOT

pytestmark = pytest.mark.slow   # Ray clusters with Ray's defaults, jobs as processes

FAST = ("generation.max_new_tokens=4", "engine.block_size=16", "engine.kv_cache_gb=0.0625")


def test_where_the_cluster_comes_from(tmp_path, monkeypatch):
    from internlm2_tp.runtime.cluster.ray_cluster import ClusterError, find_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert find_cluster("").address is None                     # nothing: a new local cluster
    with pytest.raises(ClusterError, match="ray.address=auto but no cluster was found"):
        find_cluster("auto")
    rec = tmp_path / "ray" / "ray_current_cluster"
    rec.parent.mkdir()
    rec.write_text("10.0.0.1:6379\n")
    t = find_cluster("")
    assert t.address == "10.0.0.1:6379" and str(rec) in t.source   # the local `ray start`
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert find_cluster("").source == "RAY_ADDRESS=10.0.0.2:6379"  # ray job submit
    assert find_cluster("10.0.0.3:6379").source == "ray.address=10.0.0.3:6379"
    assert find_cluster("local").address is None


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("in") / "prompts.parquet", 6)


def plain_env(home: Path, tmp: Path, **extra: str) -> dict[str, str]:
    """A plain shell's environment (no Ray variable) in a private HOME and temp folder."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    env.update(HOME=str(home), RAY_TMPDIR=str(tmp), TMPDIR=str(tmp), PYTHONPATH=str(ROOT), **extra)
    for d in (home, tmp):
        d.mkdir(parents=True, exist_ok=True)
    return env


def run_job(args: list[str], env: dict[str, str], timeout: float = 300):
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / "batch_infer.py"), *args],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return p, time.time() - t0


@pytest.mark.parametrize("case", ["stale_record", "silent", "dashboard_address"])
def test_unusable_cluster_fails_fast(case, ckpt, data, tmp_path):
    """A stale `ray start` record (its head was killed: Ray's own ray.init() then hangs for
    minutes), an address that accepts connections but never answers, and a dashboard URL in
    RAY_ADDRESS: exit 2 within seconds, with the address, its source and what to set."""
    env = plain_env(tmp_path / "home", tmp_path / "tmp")
    args = job_args(ckpt, data, tmp_path / "out", *FAST)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)   # the kernel completes handshakes; nobody ever speaks
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()       # nothing listens there any more
    if case == "stale_record":
        rec = tmp_path / "tmp" / "ray" / "ray_current_cluster"
        rec.parent.mkdir()
        rec.write_text(f"127.0.0.1:{dead_port}")
        expect = [f"127.0.0.1:{dead_port}", f"the record of the last `ray start` on this machine "
                  f"({rec})", "connection refused", "`ray start --head`", "ray.address=local"]
    elif case == "silent":
        addr = f"127.0.0.1:{silent.getsockname()[1]}"
        args += [f"ray.address={addr}", "ray.connect_timeout_s=3"]
        expect = [addr, f"(ray.address={addr}) did not answer within ray.connect_timeout_s=3s"]
    else:
        env["RAY_ADDRESS"] = "http://127.0.0.1:8265"
        expect = ["RAY_ADDRESS=http://127.0.0.1:8265", "HTTP address", "ray.address=<head-ip>:6379"]
    with silent:
        p, wall = run_job(args, env, timeout=120)
    err = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    print(*err, f"exit {p.returncode} in {wall:.1f}s", sep="\n")
    assert p.returncode == 2 and err, p.stderr[-3000:]
    assert all(e in err[0] for e in expect), err[0]
    assert "Traceback" not in p.stderr and wall < 20


# -- Ray's defaults, in a private HOME and RAY_TMPDIR ------------------------------------------
def _state(path: Path) -> tuple | None:
    return (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()) \
        if path.is_file() else None


@pytest.fixture(scope="module")
def defaults_head():
    """`ray start --head` as a user runs it, after a first local `ray.init()` left a token: no
    RAY_AUTH_MODE, so Ray turns token auth on. Nothing of it lands in the shared Ray state."""
    from internlm2_tp.runtime.cluster.ray_cluster import record_path

    shared = [record_path(), Path.home() / ".ray" / "auth_token"]
    before = [_state(p) for p in shared]
    with ray_defaults_head(num_cpus=2, token=True) as head:
        root = head["root"]
        assert (root / "home" / ".ray" / "auth_token").is_file()
        assert (root / "tmp" / "ray" / "ray_current_cluster").read_text().strip() == head["gcs"]
        yield head
        assert [_state(p) for p in shared] == before, "the shared Ray state was touched"


@pytest.fixture(scope="module")
def tp1_reference(ckpt, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1") / "out"
    run_inprocess(job_args(ckpt, data, out, *FAST))
    return {k: r["completion_token_ids"] for k, r in read_out(out).items()}


@pytest.mark.parametrize("tp", [4, 8])
def test_job_finds_the_ray_start_cluster_tp4_tp8(tp, defaults_head, ckpt, data, tp1_reference,
                                                 tmp_path):
    """No ray.* setting at all: the job finds the cluster from Ray's record, presents the token,
    shares the 2 cores out over 4 or 8 ranks, and writes what tp=1 writes."""
    out = tmp_path / "out"
    env = dict(defaults_head["env"], PYTHONPATH=str(ROOT))
    p, wall = run_job(job_args(ckpt, data, out, *FAST, f"parallel.tp={tp}"), env)
    print(f"tp={tp}: exit {p.returncode} in {wall:.1f}s")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"joined the Ray cluster at {defaults_head['gcs']} (the record of the last `ray " \
           "start` on this machine" in p.stderr
    assert f"group 0 ready: {tp} rank(s)" in p.stderr
    assert {k: r["completion_token_ids"] for k, r in read_out(out).items()} == tp1_reference


def test_job_without_the_token_is_refused(defaults_head, ckpt, data, tmp_path):
    env = dict(defaults_head["env"], PYTHONPATH=str(ROOT), HOME=str(tmp_path))   # no token here
    p, wall = run_job(job_args(ckpt, data, tmp_path / "out", *FAST), env, timeout=120)
    err = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    print(*err, f"exit {p.returncode} in {wall:.1f}s", sep="\n")
    assert p.returncode == 2 and err, p.stderr[-3000:]
    assert f"the Ray cluster at {defaults_head['gcs']} (the record of the last `ray start`" \
           in err[0] and "refused the job's authentication" in err[0] and "RAY_AUTH_TOKEN" in err[0]
    assert "Traceback" not in p.stderr and wall < 20


def _project_with_a_venv(dst: Path) -> Path:
    """This checkout as a user has it: plus a virtual environment (40 MB that do not compress)."""
    shutil.copytree(ROOT, dst, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", ".pytest_cache", "demo_out", "bench_out", "out"))
    site = dst / ".venv" / "lib" / "python3" / "site-packages"
    site.mkdir(parents=True)
    (site / "blob.bin").write_bytes(os.urandom(40 * 2**20))
    return dst


def test_ray_job_submit_uploads_only_the_project(defaults_head, ckpt, data, tp1_reference,
                                                 tmp_path):
    """`ray job submit --working-dir .` to that cluster from a checkout with a .venv: the package
    is the project alone (.gitignore; Ray's own default excludes switched off, as in Ray before
    2.5x), and the job, which Ray gives RAY_ADDRESS, finishes. Ray's job CLI sends the token
    only with RAY_AUTH_MODE=token (Ray's rule, for the CLI alone)."""
    project = _project_with_a_venv(tmp_path / "project")
    out = tmp_path / "out"
    env = dict(defaults_head["env"], RAY_AUTH_MODE="token",
               RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES="")
    job = " ".join(job_args(ckpt, data, out, *FAST))
    cmd = ["ray", "job", "submit", "--address", defaults_head["dashboard"], "--working-dir",
           str(project), "--", "sh", "-c", f"du -sk . && ls -A && python jobs/batch_infer.py {job}"]
    for _ in range(20):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
        if "No available agent to submit job" not in p.stdout + p.stderr:
            break
        time.sleep(3)   # a fresh head's dashboard agent registers a few seconds after start
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    kib = re.search(r"^(\d+)\s+\.$", p.stdout, re.M)
    print(f"uploaded working dir: {kib.group(1) if kib else '?'} KiB")
    assert kib and int(kib.group(1)) < 2048 and "\n.venv\n" not in p.stdout, log[-3000:]
    assert f"(RAY_ADDRESS={defaults_head['gcs']})" in log
    assert {k: r["completion_token_ids"] for k, r in read_out(out).items()} == tp1_reference


def test_fault_injection_from_a_plain_shell(ckpt, tmp_path):
    """The README's fault-injection command, small (its worker kills run in test_faults.py),
    with Ray's defaults: it starts its own cluster (token auth on: Ray creates the token in
    HOME) and its drivers, killed and rerun, join it."""
    root = Path(__import__("tempfile").mkdtemp(prefix="rayfi_"))   # short: Ray's socket paths
    try:
        env = plain_env(root / "home", root / "tmp")
        t0 = time.time()
        p = subprocess.run([sys.executable, str(ROOT / "jobs" / "fault_injection.py"), "rows=400",
                            "shard_rows=20", "driver_kills=1", "worker_kills=0", "seed=0",
                            "max_new_tokens=16",
                            f"model_path={ckpt}", f"workdir={tmp_path / 'fi'}"],
                           capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        print(*(x for x in p.stdout.splitlines() if x.startswith(("PASS", "FAIL", "reference"))),
              f"{time.time() - t0:.1f}s")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
        assert "PASS: 400 ids, 0 duplicated, 0 missing, 0 differ" in p.stdout
        assert (root / "home" / ".ray" / "auth_token").is_file()   # its cluster had token auth
        end = time.time() + 30
        while time.time() < end and _procs_naming(root):
            time.sleep(0.5)
        assert _procs_naming(root) == []   # its cluster stopped with it
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _procs_naming(root: Path) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(root) in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.Error:
            pass
    return out
