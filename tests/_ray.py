"""A private local Ray cluster (`ray start --head` on loopback) that is stopped alone.

`ray stop` stops every Ray cluster on the machine, including a user's or another run's, so the
cluster gets its own temp dir and is stopped by killing only the processes that belong to it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import psutil

from internlm2_tp.parallel.device import free_port


@contextlib.contextmanager
def private_ray_head(num_cpus: int = 2, dashboard: bool = True) -> Iterator[dict[str, str]]:
    """Yields {"gcs": host:port, "dashboard": http://host:port (when asked for)}."""
    ray_bin = shutil.which("ray")
    if ray_bin is None:
        raise RuntimeError("the `ray` command is missing (pip install 'ray[default]')")
    port, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ray_test_")  # short: Ray's unix socket paths have a length cap
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    args = [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={temp}"]
    args += (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
             if dashboard else ["--include-dashboard=false"])
    try:
        subprocess.run(args, check=True, capture_output=True, env=env, timeout=300)
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        _kill_cluster(temp, port)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_cluster(temp: str, port: int) -> None:
    # Agents rename themselves (`ray::DashboardAgent`), so take the named processes' whole
    # trees, collected before anything is killed; the client proxy names neither the temp dir
    # nor a live parent, but it does name the GCS port.
    doomed: list[psutil.Process] = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            argv = proc.info["cmdline"] or []
            if temp in " ".join(argv) or any(a.startswith("--address=") and a.endswith(f":{port}")
                                             for a in argv):
                doomed += [proc, *proc.children(recursive=True)]
        except psutil.Error:  # already gone
            pass
    for proc in doomed:
        try:
            proc.kill()
        except psutil.Error:
            pass
