"""Private Ray clusters for tests, each stopped alone.

`ray stop` stops every Ray cluster on the machine, including a user's or another run's, so each
cluster gets its own temp dir and is stopped by killing only the processes that belong to it.

- `private_ray_head`: `ray start --head` on loopback with its own --temp-dir; token auth off
  (the suite's own cluster) or on with a token of its own (`auth=True`).
- `ray_defaults_head`: `ray start --head` with Ray's defaults (no RAY_AUTH_MODE, the default temp
  folder and its `ray_current_cluster` record, the token in ~/.ray/auth_token), all inside a
  private HOME and RAY_TMPDIR, so neither the shared /tmp/ray nor ~/.ray is read or written.
Each yields {"gcs": host:port, "dashboard": http://host:port, "env": the environment a client
of that cluster runs with}.
- `multi_node_cluster`: a head and worker nodes, each its own raylet with its own declared
  resources (ray.cluster_utils.Cluster), in a temp dir of its own; nodes are added and killed
  (`remove_node(node, allow_graceful=False)`, as a crash) by the test.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

from internlm2_tp.parallel.group import free_port

RAY_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _ray_bin() -> str:
    ray_bin = shutil.which("ray")
    if ray_bin is None:
        raise RuntimeError("the `ray` command is missing (pip install 'ray[default]')")
    return ray_bin


@contextlib.contextmanager
def private_ray_head(num_cpus: int = 2, dashboard: bool = True,
                     auth: bool = False, metrics: bool = False) -> Iterator[dict]:
    """`metrics`: the node's Prometheus endpoint on a port of its own (yielded as "metrics")."""
    port, dash, prom = free_port(), free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ray_test_")  # short: Ray's unix socket paths have a length cap
    client = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    if auth:
        token = Path(temp) / "token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        client.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    else:
        client["RAY_AUTH_MODE"] = "disabled"
    args = [_ray_bin(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={temp}"]
    args += (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
              f"--dashboard-agent-listen-port={free_port()}"]
             if dashboard else ["--include-dashboard=false"])
    if metrics:
        args.append(f"--metrics-export-port={prom}")
    try:
        subprocess.run(args, check=True, capture_output=True, env=client, timeout=300)
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": client,
               "metrics": f"http://127.0.0.1:{prom}/metrics" if metrics else None}
    finally:
        _kill_cluster(temp, port)
        shutil.rmtree(temp, ignore_errors=True)


class MultiNode:
    """A multi-node cluster on this machine: `add(cpus, npus)` starts a worker node (with
    `npus`, one whose NPUs are emulated: internlm2_tp/testing/emulated_npu.py) and returns
    its Ray node id; `kill(node_id)` kills every process of that node at once."""

    def __init__(self, cluster, env: dict[str, str]):
        self.cluster, self.env, self.nodes = cluster, env, {}
        self.gcs = cluster.address

    def add(self, cpus: int = 1, npus: int = 0) -> str:
        from internlm2_tp.testing.emulated_npu import HOOK, HOOK_ENV

        extra = {HOOK_ENV: HOOK} if npus else {}
        with _environ(extra):   # the raylet passes its environment on to its workers
            node = self.cluster.add_node(num_cpus=cpus, resources={"NPU": npus} if npus else {})
        self.nodes[node.node_id] = node
        return node.node_id

    def kill(self, node_id: str) -> None:
        self.cluster.remove_node(self.nodes.pop(node_id), allow_graceful=False)

    def resize(self, n: int) -> None:
        """Exactly n worker nodes of one CPU each (the newest go first)."""
        while len(self.nodes) > n:
            self.kill(list(self.nodes)[-1])
        while len(self.nodes) < n:
            self.add(cpus=1)

    def full_id(self, prefix: str) -> str:
        [node] = [n for n in self.nodes if n.startswith(prefix)]
        return node


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def multi_node_cluster(head_cpus: int = 0) -> Iterator[MultiNode]:
    """A head (holding `head_cpus`: 0 keeps every group on the worker nodes; the job's driver
    joins the head) and no worker node yet. Ray's address record goes into the cluster's own
    temp dir (RAY_TMPDIR), not the shared /tmp/ray."""
    from ray.cluster_utils import Cluster

    from conftest import ROOT

    temp = tempfile.mkdtemp(prefix="raymn_")  # short: Ray's unix socket paths have a length cap
    env = {"RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    (Path(temp) / "ray").mkdir()   # where Ray writes its address record under RAY_TMPDIR
    cluster = None
    with _environ(env):
        try:
            cluster = Cluster(initialize_head=True, shutdown_at_exit=False,
                              head_node_args={"num_cpus": head_cpus, "include_dashboard": False,
                                              "temp_dir": temp})
            yield MultiNode(cluster, {**os.environ})
        finally:
            if cluster is not None:
                cluster.shutdown()
            _kill_cluster(temp, 0)   # whatever is left: every process of the cluster names temp
            shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def ray_defaults_head(num_cpus: int = 2, token: bool = True) -> Iterator[dict]:
    """`token`: a Ray token exists in ~/.ray/auth_token before `ray start` (Ray's own, as a first
    local `ray.init()` leaves it), so the cluster runs with token auth; else it runs without."""
    root = Path(tempfile.mkdtemp(prefix="rayd_"))
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    env.update(HOME=str(root / "home"), RAY_TMPDIR=str(root / "tmp"), TMPDIR=str(root / "tmp"))
    for d in ("home", "tmp"):
        (root / d).mkdir()
    port, dash, proxy = free_port(), free_port(), free_port()
    try:
        if token:
            subprocess.run([_ray_bin(), "get-auth-token", "--generate"], check=True,
                           capture_output=True, env=env, timeout=120)
        # Ports are chosen (Ray's fixed defaults 6379, 8265, 10001 and the dashboard agent's
        # 52365 may be another cluster's on this machine); the rest is Ray's.
        subprocess.run([_ray_bin(), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}",
                        "--disable-usage-stats", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dash}", f"--ray-client-server-port={proxy}",
                        f"--dashboard-agent-listen-port={free_port()}"],
                       check=True, capture_output=True, env=env, timeout=300)
        gcs = (root / "tmp" / "ray" / "ray_current_cluster").read_text().strip()
        yield {"gcs": gcs, "dashboard": f"http://127.0.0.1:{dash}", "env": env, "root": root}
    finally:
        _kill_cluster(str(root), port)
        shutil.rmtree(root, ignore_errors=True)


def _kill_cluster(temp: str, port: int) -> None:
    # Agents rename themselves (`ray::DashboardAgent`), so take the named processes' whole
    # trees, collected before anything is killed; the client proxy names neither the temp dir
    # nor a live parent, but it does name the GCS port.
    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.parents())}
    doomed: list[psutil.Process] = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            argv = proc.info["cmdline"] or []
            if proc.pid not in ours and (
                    temp in " ".join(argv) or any(a.startswith("--address=") and
                                                  a.endswith(f":{port}") for a in argv)):
                doomed += [proc, *proc.children(recursive=True)]
        except psutil.Error:  # already gone
            pass
    for proc in doomed:
        try:
            proc.kill()
        except psutil.Error:
            pass


HOLD = """import sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], logging_level="ERROR")
pg = placement_group([{"CPU": float(sys.argv[2])}])
ray.get(pg.ready(), timeout=120)
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def holding_cpus(head: dict, cpus: float) -> Iterator[None]:
    """Another driver holds `cpus` CPUs of the cluster (a placement group) until the block ends:
    a group that needs them stays pending."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, head["gcs"], str(cpus)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=head["env"])
    try:
        line = p.stdout.readline()
        assert line.strip() == "held", f"the CPU holder did not start (rc {p.poll()})"
        yield
    finally:
        p.stdin.close()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
