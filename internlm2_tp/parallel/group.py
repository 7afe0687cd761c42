"""The tensor-parallel group and its explicit collectives.

The model's collectives (all-reduce of partial sums, all-gather of vocab shards) are the only
communication inside a step. Facts a rank learns from its own device (free memory, the CPU's
native dtypes) are agreed through `agree_min` / `all_gather_object` before anything is sized
from them, so every rank's scheduler makes the same decisions.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from internlm2_tp.parallel.platform import Platform, get_platform

SHM_ENV = "INTERNLM2TP_SHM_COLLECTIVES"


@dataclass
class TPGroup:
    """A rank's view of its tensor-parallel group. With size 1 every collective is a no-op."""

    rank: int = 0
    size: int = 1
    group: object | None = None  # torch ProcessGroup when size > 1
    shm: Any = None              # ShmCollectives: CPU ranks on one host (parallel/shm.py)

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place: the elementwise sum (or "max") over the ranks."""
        if self.size > 1:
            if op == "sum" and self.shm is not None and x.is_contiguous() and x.device.type == "cpu":
                return self.shm.all_reduce(x)
            red = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
            dist.all_reduce(x, op=red, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's x along the last dim, in rank order."""
        if self.size == 1:
            return x
        if (self.shm is not None and x.device.type == "cpu"
                and x.numel() * x.element_size() <= self.shm.chunk):
            return self.shm.all_gather_last(x)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order (small Python values; pickled)."""
        if self.size == 1:
            return [obj]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """`obj` as rank `src` has it (the shared-memory collectives' file name)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def agree_min(self, value: int) -> tuple[int, list[int]]:
        """(the smallest of the ranks' values, every rank's value): one decision for all."""
        every = [int(v) for v in self.all_gather_object(int(value))]  # type: ignore[arg-type]
        return min(every), every



def init_tp_group(platform: Platform | str, rank: int, size: int, master_addr: str,
                  master_port: int, timeout_s: float = 600.0) -> TPGroup:
    """Join (or create) the default process group over TCP rendezvous, with the platform's
    backend, and return it as a TPGroup.

    `timeout_s` bounds rendezvous and every collective, so a hung or dead rank ends the group
    with an error instead of hanging forever (on Ascend HCCL_CONNECT_TIMEOUT/HCCL_EXEC_TIMEOUT
    bound the device side as well; they are set in the environment before this call).
    """
    if size == 1:
        return TPGroup()
    if isinstance(platform, str):
        platform = get_platform(platform)
    if dist.is_initialized():  # e.g. torchrun's launcher set the group up (env:// rendezvous)
        assert dist.get_world_size() == size, (dist.get_world_size(), size)
        return _with_shm(TPGroup(rank=dist.get_rank(), size=size, group=dist.group.WORLD),
                         timeout_s)
    # gloo picks the interface from the hostname unless told; keep CPU traffic on loopback
    # when the rendezvous is local.
    if platform.backend == "gloo" and master_addr in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend=platform.backend,
        init_method="env://" if master_addr == "env" else f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return _with_shm(TPGroup(rank=rank, size=size, group=dist.group.WORLD), timeout_s)


def _with_shm(tp: TPGroup, timeout_s: float) -> TPGroup:
    """CPU ranks on one host sum through shared memory (parallel/shm.py) instead of gloo;
    INTERNLM2TP_SHM_COLLECTIVES=0 keeps gloo. Every rank decides the same."""
    if dist.get_backend(tp.group) == "gloo" and os.environ.get(SHM_ENV, "1") != "0":
        from internlm2_tp.parallel.shm import open_group_shm
        tp.shm = open_group_shm(tp, timeout_s)
    return tp


def destroy_tp_group(group: TPGroup) -> None:
    group.shm = None
    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
