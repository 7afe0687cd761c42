"""The Platform base class: what every device kind answers, with the CPU's answers as defaults.

A Platform owns the torch device type, the collective backend (gloo / nccl / hccl), the
visible-devices variable and how its runtime reads it, the Ray resource and one rank's placement
bundle, the memory query, synchronize, the copy of per-step host data to the device, the op set
(norm, rotary, swiglu, linear packing) and the attention backend. A new device kind is one
subclass (a file next to this one) plus its op set and attention backend.
"""
from __future__ import annotations

import logging
import os
from typing import Any, ClassVar, Mapping, Sequence

import torch

from internlm2_tp.errors import DeviceError

log = logging.getLogger(__name__)


def ray_assigned_ids(resource: str | None) -> list[str]:
    """The device ids Ray assigned to this actor for `resource` ([] outside a Ray worker)."""
    if resource is None:
        return []
    try:
        import ray

        if not ray.is_initialized():
            return []
        ids = ray.get_runtime_context().get_accelerator_ids()
    except Exception:  # noqa: BLE001 - no ray, or not inside a worker: nothing assigned
        return []
    return [str(i) for i in ids.get(resource, [])]


class Platform:
    kind: ClassVar[str] = ""
    device_type: str = "cpu"               # torch device type of the rank's tensors
    backend: str = "gloo"                  # torch.distributed backend
    visible_env: ClassVar[str | None] = None   # restricts and renumbers the visible devices
    noset_env: ClassVar[str | None] = None     # tells Ray not to set visible_env
    ray_resource: ClassVar[str | None] = None  # Ray's name for one device

    # -- devices ----------------------------------------------------------------------------------
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def set_device(self, index: int) -> None:
        pass

    def parse_visible(self, value: str | None) -> list[str] | None:
        """The ids in the visible-devices variable, in order; None when unset (all visible)."""
        if value is None:
            return None
        ids = [i.strip() for i in value.split(",") if i.strip()]
        if len(set(ids)) != len(ids):
            raise DeviceError(f"{self.visible_env}={value!r} lists a device twice")
        return ids

    def logical_index(self, assigned: Sequence[str], env: Mapping[str, str],
                      fallback: int = 0) -> int:
        """The index for set_device: the position of the Ray-assigned id among the visible ids
        (Ray sets the variable to the actor's ids, so 0; with the NOSET variable every device
        stays visible and the id's own position counts). Without Ray: `fallback` (LOCAL_RANK)."""
        var = self.visible_env
        visible = self.parse_visible(env.get(var)) if var else None
        if assigned:
            if len(assigned) > 1:
                log.warning("Ray assigned %d %s devices (%s) to one rank; using the first",
                            len(assigned), self.kind, ",".join(assigned))
            first = str(assigned[0])
            if visible is None:
                if not first.isdigit():
                    raise DeviceError(f"Ray assigned {self.kind} id {first!r}, not an integer")
                return int(first)
            if first not in visible:
                raise DeviceError(f"Ray assigned {self.kind} {first} but {var}={env.get(var)!r} "
                                  f"does not list it ({self.noset_env}="
                                  f"{env.get(self.noset_env or '')!r}); start `ray start` with "
                                  f"the same {var} as the workers, or unset it")
            return visible.index(first)
        if fallback < 0:
            raise DeviceError(f"local device index must be >= 0, got {fallback}")
        if visible is not None and fallback >= len(visible):
            raise DeviceError(f"local device index {fallback} (LOCAL_RANK) but {var}="
                              f"{env.get(var)!r} makes only {len(visible)} device(s) visible")
        return fallback

    def local_device(self, local_index: int | None = None) -> torch.device:
        """Select this process's device: Ray's assignment under a Ray actor, else `local_index`
        (torchrun's LOCAL_RANK; None reads LOCAL_RANK, else 0)."""
        if self.visible_env is None:
            return torch.device(self.device_type)
        fallback = local_index if local_index is not None else int(os.environ.get("LOCAL_RANK", 0))
        idx = self.logical_index(ray_assigned_ids(self.ray_resource), os.environ, fallback)
        count = self.device_count()
        if idx >= count:
            raise DeviceError(f"{self.kind} device index {idx} but this process sees {count} "
                              f"device(s) ({self.visible_env}="
                              f"{os.environ.get(self.visible_env)!r})")
        self.set_device(idx)
        return torch.device(f"{self.device_type}:{idx}")

    def synchronize(self, device: torch.device) -> None:
        """Wait for the device's queued work (timings, memory statistics)."""

    def free_memory(self, device: torch.device) -> int | None:
        """Free bytes on the device now; None where there is no such figure (CPU)."""
        return None

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Per-step host data (indices, lengths) to the device without waiting for its queue."""
        return host.to(device)

    # -- cluster ----------------------------------------------------------------------------------
    def ray_resources(self, cpus: float) -> tuple[dict[str, float], dict[str, Any]]:
        """(placement bundle, actor options) for one rank."""
        return {"CPU": cpus}, {"num_cpus": cpus}

    def job_env(self, parallel: Any) -> dict[str, str]:
        """Environment every rank of this kind needs (set before its process group)."""
        return {}

    # -- compute ----------------------------------------------------------------------------------
    def prepare_process(self) -> None:
        """Once per rank process, before the model is built: process-wide settings the device
        wants (none by default)."""

    def model_dtype(self, name: str, cfg: Any) -> torch.dtype:
        """model.dtype on this device: `auto` is the checkpoint's dtype, on a CPU only where it
        multiplies bf16 natively (config.resolve_dtype)."""
        from internlm2_tp.config import resolve_dtype
        return resolve_dtype(name, cfg, self.device_type)

    def ops(self) -> Any:
        from internlm2_tp.ops import TorchOps
        return TorchOps()

    def attention(self) -> Any:
        from internlm2_tp.attention import TorchAttention
        return TorchAttention(self.to_device)
