"""The one thin device layer: which torch device a rank uses, which collective backend, and the
tensor-parallel group with its explicit collectives (all-reduce, all-gather).

cpu -> gloo, cuda -> nccl, npu -> hccl (torch_npu is imported only when npu is asked for).
Device selection understands Ray's visible-devices handling (ASCEND_RT_VISIBLE_DEVICES /
CUDA_VISIBLE_DEVICES, and the RAY_EXPERIMENTAL_NOSET_* variables that switch it off).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}

# The variable that restricts (and renumbers) the devices a process sees, the Ray variable that
# tells Ray not to set it, and Ray's resource name, per device type.
VISIBLE_ENV = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}
NOSET_ENV = {"npu": "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES",
             "cuda": "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"}
RAY_RESOURCE = {"npu": "NPU", "cuda": "GPU"}

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The device settings cannot work; the message names the setting or variable."""


def import_torch_npu() -> None:
    """Importing torch_npu registers the 'npu' device and the hccl backend with torch."""
    try:
        import torch_npu  # noqa: F401
    except ImportError as e:
        raise DeviceError("parallel.device=npu needs torch_npu (pip install 'internlm2-tp[npu]' "
                          "with the torch_npu build that pairs with your torch and CANN; see "
                          "docs/DEPLOY_ASCEND.md)") from e


def resolve_device_type(name: str) -> str:
    """`auto` picks npu when torch_npu imports and an NPU is visible, else cuda, else cpu."""
    if name not in ("auto", "npu", "cuda", "cpu"):
        raise ValueError(f"parallel.device must be one of auto, npu, cuda, cpu; got {name!r}")
    if name == "npu":
        import_torch_npu()
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            raise DeviceError("parallel.device=npu but torch.npu.is_available() is False (check "
                              f"`npu-smi info`, the CANN environment (set_env.sh) and "
                              f"{VISIBLE_ENV['npu']}={os.environ.get(VISIBLE_ENV['npu'])!r})")
        return "npu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("parallel.device=cuda but torch.cuda.is_available() is False "
                              f"({VISIBLE_ENV['cuda']}={os.environ.get(VISIBLE_ENV['cuda'])!r})")
        return "cuda"
    if name == "cpu":
        return "cpu"
    try:
        import torch_npu  # noqa: F401
        if torch.npu.is_available():  # type: ignore[attr-defined]
            return "npu"
    except Exception as e:  # noqa: BLE001 - ImportError, or CANN libraries missing (OSError)
        log.debug("auto device: torch_npu unusable (%s)", e)
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_visible(device_type: str, value: str | None) -> list[str] | None:
    """The ids in a visible-devices variable, in order; None when unset (all devices visible).

    CANN requires ASCEND_RT_VISIBLE_DEVICES to list distinct integer ids in ascending order;
    CUDA_VISIBLE_DEVICES may also hold GPU UUIDs, so only duplicates are refused there.
    """
    if value is None:
        return None
    var = VISIBLE_ENV[device_type]
    ids = [i.strip() for i in value.split(",") if i.strip()]
    if len(set(ids)) != len(ids):
        raise DeviceError(f"{var}={value!r} lists a device twice")
    if device_type == "npu":
        if not all(i.isdigit() for i in ids):
            raise DeviceError(f"{var}={value!r} must be comma-separated integer device ids")
        if [int(i) for i in ids] != sorted(int(i) for i in ids):
            raise DeviceError(f"{var}={value!r} must list device ids in ascending order "
                              "(CANN refuses any other order)")
    return ids


def ray_assigned_ids(device_type: str) -> list[str]:
    """The physical device ids Ray assigned to this actor ([] outside a Ray worker)."""
    if device_type not in RAY_RESOURCE:
        return []
    try:
        import ray

        if not ray.is_initialized():
            return []
        ids = ray.get_runtime_context().get_accelerator_ids()
    except Exception:  # noqa: BLE001 - no ray, or not inside a worker: nothing assigned
        return []
    return [str(i) for i in ids.get(RAY_RESOURCE[device_type], [])]


def logical_index(device_type: str, assigned: Sequence[str], env: Mapping[str, str],
                  fallback: int = 0) -> int:
    """The index to pass to set_device: the logical index of this process's device.

    Visible-devices variables renumber devices from 0 in the order listed. Ray normally sets the
    variable to the actor's own ids, so its device is logical 0; with the NOSET variable Ray
    leaves it alone, every device stays visible, and the actor must pick its assigned physical
    id's position among the visible ones (its plain number when nothing restricts them). Both
    cases are the same rule: the position of the assigned id in the visible list.
    Without a Ray assignment (torchrun, tests) `fallback` (LOCAL_RANK) is the index.
    """
    var = VISIBLE_ENV.get(device_type)
    visible = parse_visible(device_type, env.get(var)) if var else None
    if assigned:
        if len(assigned) > 1:
            log.warning("Ray assigned %d %s devices (%s) to one rank; using the first",
                        len(assigned), device_type, ",".join(assigned))
        first = str(assigned[0])
        if visible is None:
            if not first.isdigit():
                raise DeviceError(f"Ray assigned {device_type} id {first!r}, not an integer")
            return int(first)
        if first not in visible:
            raise DeviceError(f"Ray assigned {device_type} {first} but {var}={env.get(var)!r} "
                              f"does not list it ({NOSET_ENV[device_type]}="
                              f"{env.get(NOSET_ENV[device_type])!r}); start `ray start` with "
                              f"the same {var} as the workers, or unset it")
        return visible.index(first)
    if fallback < 0:
        raise DeviceError(f"local device index must be >= 0, got {fallback}")
    if visible is not None and fallback >= len(visible):
        raise DeviceError(f"local device index {fallback} (LOCAL_RANK) but {var}="
                          f"{env.get(var)!r} makes only {len(visible)} device(s) visible")
    return fallback


def local_device(device_type: str, local_index: int | None = None) -> torch.device:
    """Select and return this process's device.

    Under a Ray actor that Ray assigned a device, the assignment decides (see logical_index);
    otherwise `local_index` (torchrun's LOCAL_RANK; None reads LOCAL_RANK, else 0).
    """
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type not in VISIBLE_ENV:
        raise ValueError(f"unknown device type {device_type!r}")
    if device_type == "npu":
        import_torch_npu()
    fallback = local_index if local_index is not None else int(os.environ.get("LOCAL_RANK", 0))
    idx = logical_index(device_type, ray_assigned_ids(device_type), os.environ, fallback)
    mod = getattr(torch, device_type)
    count = mod.device_count()
    if idx >= count:
        var = VISIBLE_ENV[device_type]
        raise DeviceError(f"{device_type} device index {idx} but this process sees {count} "
                          f"device(s) ({var}={os.environ.get(var)!r})")
    mod.set_device(idx)
    return torch.device(f"{device_type}:{idx}")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings, and before reading memory statistics)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


@dataclass
class TPGroup:
    """A rank's view of its tensor-parallel group. With size 1 every collective is a no-op."""

    rank: int = 0
    size: int = 1
    group: object | None = None  # torch ProcessGroup when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's x along the last dim, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)


def init_tp_group(device_type: str, rank: int, size: int, master_addr: str, master_port: int,
                  timeout_s: float = 600.0) -> TPGroup:
    """Join (or create) the default process group over TCP rendezvous and return it as a TPGroup.

    `timeout_s` bounds rendezvous and every collective, so a hung or dead rank ends the group
    with an error instead of hanging forever (on Ascend HCCL_CONNECT_TIMEOUT/HCCL_EXEC_TIMEOUT
    bound the device side as well; they are set in the environment before this call).
    """
    if size == 1:
        return TPGroup()
    if dist.is_initialized():  # e.g. torchrun's launcher set the group up (env:// rendezvous)
        assert dist.get_world_size() == size, (dist.get_world_size(), size)
        return TPGroup(rank=dist.get_rank(), size=size, group=dist.group.WORLD)
    backend = BACKENDS[device_type]
    if device_type == "npu":
        import_torch_npu()
    # gloo picks the interface from the hostname unless told; keep CPU traffic on loopback
    # when the rendezvous is local.
    if device_type == "cpu" and master_addr in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend=backend,
        init_method="env://" if master_addr == "env" else f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return TPGroup(rank=rank, size=size, group=dist.group.WORLD)


def destroy_tp_group(group: TPGroup) -> None:
    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
