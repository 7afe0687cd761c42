"""Ray nodes whose NPUs are emulated: `parallel.device=npu` ranks there run NpuPlatform on CPU
tensors with the torch_npu stand-in (fake_torch_npu.py), while Ray does its real NPU bookkeeping
(the node's declared {"NPU": n}, one device per actor, ASCEND_RT_VISIBLE_DEVICES per actor).

Install it in every worker process of a node with Ray's worker setup hook, set in the node's
environment before it starts (tests/_ray.py does this for its multi-node clusters):

    __RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR=internlm2_tp.testing.emulated_npu.install \
        ray start --address=HEAD --resources='{"NPU": 2}'
"""
from __future__ import annotations

import os
from typing import Any

from internlm2_tp.parallel.platform import PLATFORMS, NpuPlatform
from internlm2_tp.testing.fake_torch_npu import FakeTorchNpu

HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"   # Ray's name (ray_constants)
HOOK = "internlm2_tp.testing.emulated_npu.install"


class EmulatedNpuPlatform(NpuPlatform):
    """NpuPlatform with the stand-in: as many devices as ASCEND_RT_VISIBLE_DEVICES lists."""

    def __init__(self, torch_npu: Any = None, emulate: bool = True):
        visible = os.environ.get(self.visible_env or "")
        count = len(visible.split(",")) if visible else 8
        super().__init__(torch_npu or FakeTorchNpu(device_count=count), emulate=True)


def install() -> None:
    """Make `npu` the emulated platform in this process (Ray's worker setup hook)."""
    PLATFORMS["npu"] = EmulatedNpuPlatform
