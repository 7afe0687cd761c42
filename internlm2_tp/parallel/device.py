"""The one thin device layer: which torch device a rank uses, which collective backend, and the
tensor-parallel group with its explicit collectives (all-reduce, all-gather).

cpu -> gloo, cuda -> nccl, npu -> hccl (torch_npu is imported only when npu is asked for).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def import_torch_npu() -> None:
    """Importing torch_npu registers the 'npu' device and the hccl backend with torch."""
    try:
        import torch_npu  # noqa: F401
    except ImportError as e:
        raise RuntimeError("parallel.device=npu needs torch_npu (pip install 'internlm2-tp[npu]' "
                           "with the torch_npu build that pairs with your torch and CANN)") from e


def resolve_device_type(name: str) -> str:
    """`auto` picks npu when torch_npu imports and an NPU is visible, else cuda, else cpu."""
    if name not in ("auto", "npu", "cuda", "cpu"):
        raise ValueError(f"parallel.device must be one of auto, npu, cuda, cpu; got {name!r}")
    if name == "npu":
        import_torch_npu()
        return "npu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but torch.cuda.is_available() is False")
        return "cuda"
    if name == "cpu":
        return "cpu"
    try:
        import torch_npu  # noqa: F401
        if torch.npu.is_available():  # type: ignore[attr-defined]
            return "npu"
    except ImportError:
        pass
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device(device_type: str, local_index: int = 0) -> torch.device:
    """Under Ray the visible-devices variable leaves each actor one logical device: index 0."""
    if device_type == "cpu":
        return torch.device("cpu")
    if device_type == "npu":
        import_torch_npu()
        torch.npu.set_device(local_index)  # type: ignore[attr-defined]
    elif device_type == "cuda":
        torch.cuda.set_device(local_index)
    return torch.device(f"{device_type}:{local_index}")


def synchronize(device: torch.device) -> None:
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
