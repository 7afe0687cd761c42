"""The package's C kernels (CPU only): each source built once per machine with the system C
compiler, cached, and loaded with ctypes; plain C with no torch headers, so a build takes
about a second.

A build is keyed by the source, the compiler and flags and this CPU's flags (`-march=native`),
written to a temporary name and renamed, so ranks building at once never load half a file.
No compiler, a failed build, or INTERNLM2TP_CPU_KERNELS=0: `load()` returns None, with one
warning per source, and the caller runs its plain torch path.

OpenMP: a library asks for libgomp.so.1 by soname, so in a process where torch has loaded its
own libgomp it runs on torch's thread pool (whose threads are still spinning from the last op)
instead of a second pool fighting it for the cores.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# The element types the kernels take, as their `bf16` argument codes.
C_DTYPES = {torch.bfloat16: 1, torch.float32: 0}

CFLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fopenmp"]
_loaded: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "internlm2_tp" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _writable(d: Path) -> Path:
    """d, or a per-user folder under the temp dir where d cannot be created or written (a
    read-only home)."""
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"internlm2_tp-kernels-{os.getuid()}"


def build(source: Path, out_dir: Path | None = None, extra: tuple[str, ...] = ()) -> Path:
    """The shared library of `source` (compiled with CFLAGS and `extra`), built here unless a
    matching one exists."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    src = source.read_bytes()
    flags = [*CFLAGS, *extra]
    key = hashlib.sha256(src + " ".join([cc, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    out_dir = out_dir or _writable(cache_dir())
    lib = out_dir / f"{source.stem}-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        p = subprocess.run([cc, *flags, "-o", tmp, str(source), "-lm"],
                           capture_output=True, text=True, timeout=120)
        if p.returncode:
            raise RuntimeError(f"{cc} failed on {source.name}: {p.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load(source: Path, extra: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`source`'s library, or None (disabled, or it cannot be built here: warned once)."""
    if os.environ.get("INTERNLM2TP_CPU_KERNELS", "1") == "0":
        return None
    key = str(source)
    if key not in _loaded:
        try:
            _loaded[key] = ctypes.CDLL(str(build(source, extra=extra)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("CPU kernel %s unavailable, using the plain path: %s", source.name, e)
            _loaded[key] = None
    return _loaded[key]
