"""Plain CPUs."""
from __future__ import annotations

from typing import Any

from internlm2_tp.parallel.platform.base import Platform


class CpuPlatform(Platform):
    """Plain CPUs: the torch op set (matmul weights repacked for oneDNN), gloo."""
    kind = "cpu"

    def attention(self) -> Any:
        """The plain backend, with decode rows through the compiled CPU kernel when this
        machine can build it (attention/cpu_kernel.py)."""
        from internlm2_tp.attention import TorchAttention
        from internlm2_tp.attention.cpu_kernel import load

        return TorchAttention(self.to_device, decode_kernel=load())
