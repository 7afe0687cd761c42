"""Everything that differs between device kinds, one class (and file) per kind.

    platform = get_platform("auto")              # NpuPlatform, CudaPlatform or CpuPlatform
    device = platform.local_device(local_index)  # selects the rank's device (Ray-aware)
    ops, attention = platform.ops(), platform.attention()

NpuPlatform(torch_npu=stand_in, emulate=True) runs the NPU op set and attention backend on CPU
tensors over gloo: the test suite's way to execute the Ascend path without a device.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import torch

from internlm2_tp.errors import DeviceError
from internlm2_tp.parallel.kinds import AUTO_ORDER, DEVICE_CHOICES, check_device
from internlm2_tp.parallel.platform.base import Platform, ray_assigned_ids
from internlm2_tp.parallel.platform.cpu import CpuPlatform
from internlm2_tp.parallel.platform.cuda import CudaPlatform
from internlm2_tp.parallel.platform.npu import NpuPlatform

__all__ = ["AUTO_ORDER", "DEVICE_CHOICES", "CpuPlatform", "CudaPlatform", "DeviceError",
           "NpuPlatform", "PLATFORMS", "Platform", "cluster_kind", "get_platform", "platform_for",
           "ray_assigned_ids"]
log = logging.getLogger(__name__)

PLATFORMS: dict[str, type[Platform]] = {"cpu": CpuPlatform, "cuda": CudaPlatform,
                                        "npu": NpuPlatform}


def get_platform(name: str) -> Platform:
    """The platform for `parallel.device`: `auto` is npu when torch_npu imports and sees an NPU,
    else cuda when a GPU is visible, else cpu. A named kind must be usable in this process."""
    check_device(name)
    if name == "auto":
        for kind in AUTO_ORDER:
            try:
                platform = PLATFORMS[kind]()
                if platform.is_available():
                    return platform
            except Exception as e:  # noqa: BLE001 - no torch_npu, or CANN libraries missing
                log.debug("auto device: %s unusable (%s)", kind, e)
        return CpuPlatform()
    platform = PLATFORMS[name]()
    if not platform.is_available():
        var = platform.visible_env
        hint = " (check `npu-smi info` and the CANN environment, set_env.sh)" if name == "npu" \
            else ""
        raise DeviceError(f"parallel.device={name} but no {name} device is available{hint} "
                          f"({var}={os.environ.get(var or '')!r})")
    return platform


def platform_for(device: torch.device) -> Platform:
    """The default platform of tensors on `device` (`meta`: the CPU's plain ops)."""
    return PLATFORMS.get(device.type, CpuPlatform)()


def cluster_kind(resources: Mapping[str, float]) -> str:
    """`auto` on a Ray cluster: the first kind whose Ray resource the cluster has, else cpu."""
    return next((k for k in AUTO_ORDER if resources.get(PLATFORMS[k].ray_resource or "")), "cpu")
