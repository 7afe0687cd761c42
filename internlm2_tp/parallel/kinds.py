"""The device kinds `parallel.device` names. Torch-free: the job's configuration is checked
against them before anything heavy is imported; the platform layer (parallel/platform/) has one
class per kind."""
from __future__ import annotations

from internlm2_tp.errors import JobConfigError

DEVICE_CHOICES = ("auto", "npu", "cuda", "cpu")
AUTO_ORDER = ("npu", "cuda")   # what `auto` prefers, before the CPU


def check_device(name: str) -> None:
    if name not in DEVICE_CHOICES:
        raise JobConfigError(f"parallel.device must be one of {', '.join(DEVICE_CHOICES)}; "
                             f"got {name!r}")
