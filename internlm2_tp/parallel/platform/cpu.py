"""Plain CPUs."""
from __future__ import annotations

from internlm2_tp.parallel.platform.base import Platform


class CpuPlatform(Platform):
    """Plain CPUs: the torch op set (matmul weights repacked for oneDNN), gloo."""
    kind = "cpu"
