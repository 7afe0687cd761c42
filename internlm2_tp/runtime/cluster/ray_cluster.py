"""Finding and joining the job's Ray cluster within a bounded time, and what the cluster can hold.

Where the cluster comes from, in this order: `ray.address` (`local`: a new local cluster, stopped
with the job), `RAY_ADDRESS` (what `ray job submit` sets), the record of the last `ray start` on
this machine (`ray_current_cluster` in Ray's temp folder), else a new local cluster. An existing
cluster must answer within `ray.connect_timeout_s`; one that is gone, silent, or refuses the job
(authentication, a Ray version mismatch) is a ClusterError (exit 2) that names the address, how it
was found and what to set.

Authentication is the cluster's own: when RAY_AUTH_MODE is unset and a Ray token is available
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) the job presents it (a cluster without
token auth ignores it). A local cluster the job starts keeps Ray's default, token auth (Ray
creates ~/.ray/auth_token if missing): Ray binds its GCS and raylet to the host's network
address, not loopback. RAY_AUTH_MODE set in the environment is obeyed as it is.

Ray is imported inside the functions: the torchrun path imports this module's errors' users
without paying for importing Ray.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from internlm2_tp.errors import EXIT_BAD_INPUT, ClusterError

log = logging.getLogger(__name__)
SLICE_S = 0.25   # waits return to Python this often, so SIGTERM / Ctrl-C act at once


@dataclass(frozen=True)
class ClusterTarget:
    address: str | None   # None: start a new local cluster
    source: str           # how it was found, for messages
    here: bool = False    # on this machine (new, or `ray start`ed here): workers import this checkout


def worker_runtime_env() -> dict[str, Any]:
    """Ray's runtime_env for the job's actors: the checkout that holds the internlm2_tp package
    this process imported goes first on their PYTHONPATH, so they run the driver's code (under
    `ray job submit --working-dir` that is the uploaded directory)."""
    import internlm2_tp

    root = str(Path(internlm2_tp.__file__).resolve().parents[1])
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}}


def record_path() -> Path:
    """Ray's record of the last local `ray start` (its default temp folder follows RAY_TMPDIR,
    then TMPDIR)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(base) / "ray" / "ray_current_cluster"


def find_cluster(setting: str) -> ClusterTarget:
    if setting == "local":
        return ClusterTarget(None, "ray.address=local", here=True)
    if setting and setting != "auto":
        return ClusterTarget(setting, f"ray.address={setting}")
    if os.environ.get("RAY_ADDRESS"):
        return ClusterTarget(os.environ["RAY_ADDRESS"], f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}")
    rec = record_path()
    addr = rec.read_text().strip() if rec.is_file() else ""
    if addr:
        return ClusterTarget(addr, f"the record of the last `ray start` on this machine ({rec})",
                             here=True)
    if setting == "auto":
        raise ClusterError(f"ray.address=auto but no cluster was found: RAY_ADDRESS is unset and "
                           f"there is no {rec} (start one with `ray start --head`, or set "
                           "ray.address=host:port)")
    return ClusterTarget(None, f"no ray.address, no RAY_ADDRESS and no `ray start` record ({rec})",
                         here=True)


def _signals_kept() -> Any:
    """ray.init() installs its own SIGTERM handler (sys.exit); put the caller's back."""
    main = threading.current_thread() is threading.main_thread()
    return signal.getsignal(signal.SIGTERM) if main else None


def _init(address: str, **kw: Any) -> None:
    import ray

    from internlm2_tp.runtime.interrupts import Terminated
    old = _signals_kept()
    try:
        ray.init(address=address, logging_level=logging.WARNING, **kw)
    except SystemExit as e:   # Ray's SIGTERM handler during init
        if e.code == signal.SIGTERM:
            raise Terminated("SIGTERM") from None
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def connect(setting: str, timeout_s: float, runtime_env: dict | None = None) -> ClusterTarget:
    """ray.init() on the job's cluster; returns where it is and how it was found.
    `runtime_env` applies to a cluster on this machine (a new one, or one `ray start`ed here)."""
    target = find_cluster(setting)
    env = {"runtime_env": runtime_env} if runtime_env and target.here else {}
    if target.address is None:
        log.info("starting a local Ray cluster (%s)", target.source)
        _init("local", include_dashboard=False, **env)
        return target
    if "://" in target.address and not target.address.startswith("ray://"):
        raise ClusterError(f"{target.source}: {target.address} is an HTTP address (the "
                           "dashboard's, for `ray job submit --address`); the job joins the "
                           "cluster itself: set ray.address=<head-ip>:6379 (the GCS address)")
    _present_token()
    _await_probe(target, timeout_s)
    silent = _silent(target, timeout_s)
    # ray.init() retries inside Ray for minutes when the cluster stops answering now; nothing of
    # the job runs yet, so past the timeout the process ends with the message (exit 2).
    watchdog = threading.Timer(timeout_s, _give_up, (silent,))
    watchdog.daemon = True
    watchdog.start()
    try:
        _init(target.address, **env)
    except Exception as e:  # noqa: BLE001 - version mismatch, refused, auth
        raise ClusterError(f"cannot join the Ray cluster at {target.address} ({target.source}): "
                           f"{_first_line(e)}{_hint(target)}") from None
    finally:
        watchdog.cancel()
    log.info("joined the Ray cluster at %s (%s)", target.address, target.source)
    return target


def _silent(target: ClusterTarget, timeout_s: float) -> str:
    return (f"the Ray cluster at {target.address} ({target.source}) did not answer within "
            f"ray.connect_timeout_s={timeout_s:g}s{_hint(target)}")


def _give_up(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_BAD_INPUT)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _hint(target: ClusterTarget) -> str:
    if target.here:   # found in the `ray start` record
        return ("; if that cluster was stopped, start one with `ray start --head`, or run with "
                "ray.address=local for a private cluster stopped with the job")
    return "; check the address, or run with ray.address=local for a private local cluster"


def _token_available() -> bool:
    try:
        from ray._raylet import AuthenticationTokenLoader
        return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))
    except (ImportError, AttributeError):   # a Ray without token authentication
        return False


def _present_token() -> None:
    """Present the local Ray token when one exists (as Ray itself does for a cluster it finds on
    its own), unless RAY_AUTH_MODE says otherwise. RAY_AUTH_MODE=token without any token is
    refused here: Ray would abort the process."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None and _token_available():
        try:
            from ray._private.authentication.authentication_token_setup import _enable_token_auth
            _enable_token_auth()   # sets RAY_AUTH_MODE=token and reloads Ray's config
        except ImportError:
            os.environ["RAY_AUTH_MODE"] = "token"
    elif mode == "token" and not _token_available():
        raise ClusterError("RAY_AUTH_MODE=token but no Ray token was found: set RAY_AUTH_TOKEN, "
                           "or RAY_AUTH_TOKEN_PATH, or copy the cluster's token (`ray "
                           "get-auth-token` on the head) to ~/.ray/auth_token")


def _await_probe(target: ClusterTarget, timeout_s: float) -> None:
    """Probe the cluster on a helper thread; this thread waits in slices (signals act)."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            _probe(target, time.monotonic() + timeout_s, timeout_s)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e
    t = threading.Thread(target=run, name="ray-probe", daemon=True)
    t.start()
    end = time.monotonic() + timeout_s
    while t.is_alive() and time.monotonic() < end:
        t.join(SLICE_S)
    if t.is_alive():
        raise ClusterError(_silent(target, timeout_s))
    if "error" in box:
        raise box["error"]


def _probe(target: ClusterTarget, deadline: float, timeout_s: float) -> None:
    addr = target.address or ""
    hostport = addr.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"{target.source}: {addr!r} is not host:port")
    while True:   # a refused connection: nothing listens there any more
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            break
        except ConnectionRefusedError:
            raise ClusterError(f"no Ray cluster at {addr} ({target.source}): connection refused, "
                               f"the cluster is gone{_hint(target)}") from None
        except OSError:   # unreachable or filtered: maybe not yet
            if time.monotonic() > deadline:
                raise ClusterError(_silent(target, timeout_s)) from None
            time.sleep(0.5)
    if addr.startswith("ray://"):
        return
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    try:
        GcsClient(address=addr)
    except AuthenticationError as e:
        raise ClusterError(
            f"the Ray cluster at {addr} ({target.source}) refused the job's authentication "
            f"({str(e).splitlines()[0][:160]}): give the job that cluster's token with "
            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or copy it (`ray get-auth-token` on the head) "
            "to ~/.ray/auth_token") from None
    except Exception:  # noqa: BLE001 - ray.init() reports it in its own words
        return


def disconnect() -> None:
    """ray.shutdown() (which stops a cluster the job started) without being cut short by a
    signal: one that arrives meanwhile is raised when it is done."""
    import ray

    from internlm2_tp.runtime.interrupts import InterruptGuard
    with InterruptGuard() as guard, guard.critical():
        ray.shutdown()
