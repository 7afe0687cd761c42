"""The CPU decode-attention kernel (cpu_decode.c): built once per machine with the system C
compiler, cached, and called through ctypes.

Why a kernel: on CPU, the plain path copies every decode row's blocks out of the cache
(index_select) before SDPA reads them again, and at a few hundred rows that traffic costs more
than the layer's matmuls. The kernel reads keys and values in place, once.

The build is keyed by the source, the compiler flags and this CPU's flags (`-march=native`),
written to a temporary name and renamed, so ranks building at once never load half a file.
No compiler, a failed build, or INTERNLM2TP_CPU_KERNELS=0: `load()` returns None, with one
warning, and the plain path runs.
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

SOURCE = Path(__file__).with_name("cpu_decode.c")
# Vectorizing the dot products needs reassociation; finite-math stays off (-inf is the
# softmax's start).
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-shared", "-fPIC", "-fopenmp"]
DTYPES = {torch.bfloat16: 1, torch.float32: 0}
_loaded: dict[str, DecodeKernel | None] = {}


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


def build(out_dir: Path | None = None) -> Path:
    """The kernel's shared library, built here unless a matching one exists."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *CFLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"cpu_decode-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        p = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"],
                           capture_output=True, text=True, timeout=120)
        if p.returncode:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {p.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


class DecodeKernel:
    """decode(q, k_cache, v_cache, tables, ctx, out, scale) -> bool (False: not handled)."""

    def __init__(self, lib: Path):
        self.lib = ctypes.CDLL(str(lib))
        f = self.lib.decode_attention
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float,
                                                                     ctypes.c_int64]
        self.fn = f

    @staticmethod
    def supports(cache: torch.Tensor, num_heads: int) -> bool:
        """The kernel's limits (cpu_decode.c): fp32 or bf16, head_dim a multiple of 16 up to
        256, up to 16 query heads per KV head, blocks of up to 256 keys."""
        _, bs, kvh, d = cache.shape
        return (cache.device.type == "cpu" and cache.dtype in DTYPES and cache.is_contiguous()
                and d % 16 == 0 and d <= 256 and num_heads % kvh == 0
                and num_heads // kvh <= 16 and bs <= 256)

    def decode(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
               tables: torch.Tensor, ctx: torch.Tensor, out: torch.Tensor, scale: float) -> bool:
        """q [rows, H, d] (contiguous) -> out [rows, H*d] (contiguous), in place."""
        rows, heads, d = q.shape
        _, bs, kvh, _ = kv[0].shape
        tables, ctx = tables.contiguous(), ctx.contiguous()
        assert tables.dtype == ctx.dtype == torch.int64 and out.is_contiguous()
        rc = self.fn(q.data_ptr(), kv[0].data_ptr(), kv[1].data_ptr(), tables.data_ptr(),
                     ctx.data_ptr(), out.data_ptr(), rows, kvh, heads // kvh, d, bs,
                     tables.shape[1], DTYPES[q.dtype], scale, torch.get_num_threads())
        return rc == 0


def load() -> DecodeKernel | None:
    """The kernel, or None (disabled, or it cannot be built here: warned once)."""
    if os.environ.get("INTERNLM2TP_CPU_KERNELS", "1") == "0":
        return None
    if "k" not in _loaded:
        try:
            _loaded["k"] = DecodeKernel(build())
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("CPU decode-attention kernel unavailable, using the plain path: %s", e)
            _loaded["k"] = None
    return _loaded["k"]
