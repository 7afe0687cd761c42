"""Collectives for CPU ranks on one host through shared memory, instead of gloo over TCP.

A tp=2 decode step all-reduces 2 x layers + 1 small tensors; gloo sends each through the
loopback stack (two copies and a socket round trip per rank), which costs more than the
arithmetic on a small model. Here the group maps one file in /dev/shm:

    [flags: one 64-byte line per rank][slots: 2 (parity) x world x chunk bytes]

A collective copies this rank's part into its slot of the current parity, publishes its
sequence number in its flag, waits until every rank's flag has reached it, then reads every
slot. Two parities: a rank can run ahead by one collective without overwriting a slot a slower
rank still reads (reaching collective n + 2 needs every flag at n + 1, set after reading n).
Tensors larger than a slot go in chunks. Sums add the slots in rank order (bf16/fp16 in fp32),
the same order on every rank, so every rank holds bitwise the same result.

Only on x86-64 (its stores are seen in program order: a flag is never seen before the data it
publishes), and only when every rank runs on this host. A wait is bounded by the group's
timeout, like gloo's, and ends early with an error when a peer process is gone.
"""
from __future__ import annotations

import os
import platform
import socket
import tempfile
import time
from typing import Any

import numpy as np
import torch

LINE = 64                    # bytes per flag (one cache line each: no false sharing)
BUDGET = 32 << 20            # bytes of slots in all, whatever the world size


def host_id() -> str:
    """This host, as the ranks compare it (hostname and boot id)."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class ShmCollectives:
    def __init__(self, path: str, rank: int, world: int, timeout_s: float):
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.chunk = BUDGET // (2 * world) // LINE * LINE
        size = LINE * world + 2 * world * self.chunk
        self.buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        self.flags = self.buf[:LINE * world].numpy().view(np.int64)[::LINE // 8]   # [world]
        self.pids = np.zeros(world, dtype=np.int64)
        self.seq = 0

    @staticmethod
    def create(world: int) -> str:
        """A zero-filled segment for `world` ranks; its path (the caller unlinks it once every
        rank has mapped it). Raises OSError when /dev/shm cannot hold it."""
        chunk = BUDGET // (2 * world) // LINE * LINE
        fd, path = tempfile.mkstemp(prefix="internlm2tp-", dir="/dev/shm")
        try:
            os.posix_fallocate(fd, 0, LINE * world + 2 * world * chunk)  # no SIGBUS later
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return path

    def set_pids(self, pids: list[int]) -> None:
        self.pids[:] = pids

    def _slot(self, parity: int, rank: int, nbytes: int) -> torch.Tensor:
        start = LINE * self.world + (parity * self.world + rank) * self.chunk
        return self.buf[start:start + nbytes]

    def _wait_all(self, seq: int) -> None:
        flags, t0, spins = self.flags, time.monotonic(), 0
        while int(flags.min()) < seq:
            spins += 1
            if spins < 2000:
                continue
            now = time.monotonic()
            for r in np.nonzero(flags < seq)[0]:
                if now - t0 > self.timeout_s:
                    raise RuntimeError(f"shared-memory collective timed out after "
                                       f"{self.timeout_s:.0f}s waiting for rank {r}")
                if spins % 20000 == 0 and not _alive(int(self.pids[r])):
                    raise RuntimeError(f"rank {r} (pid {self.pids[r]}) is gone")
            time.sleep(0 if spins < 20000 else 1e-4)

    def _round(self, part: torch.Tensor) -> list[torch.Tensor]:
        """Publish `part` (flat bytes, at most a chunk); every rank's part, in rank order."""
        self.seq += 1
        parity, n = self.seq % 2, part.numel()
        self._slot(parity, self.rank, n).copy_(part)
        self.flags[self.rank] = self.seq
        self._wait_all(self.seq)
        return [self._slot(parity, r, n) for r in range(self.world)]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; x contiguous."""
        flat = x.view(-1)
        per = self.chunk // x.element_size()
        wide = x.dtype in (torch.bfloat16, torch.float16) and self.world > 2
        for i in range(0, flat.numel(), per):
            piece = flat[i:i + per]
            parts = [p.view(x.dtype) for p in self._round(piece.view(torch.uint8))]
            if self.world == 2:
                torch.add(parts[0], parts[1], out=piece)
            else:
                acc = parts[0].float() if wide else parts[0].clone()
                for p in parts[1:]:
                    acc += p
                piece.copy_(acc)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x concatenated along the last dim, in rank order (x fits one chunk)."""
        x = x.contiguous()
        raw = x.view(-1).view(torch.uint8)
        if raw.numel() > self.chunk:
            raise ValueError(f"{raw.numel()} bytes exceed the {self.chunk}-byte slot")
        return torch.cat([p.view(x.dtype).view(x.shape) for p in self._round(raw)], dim=-1)


def open_group_shm(tp: Any, timeout_s: float) -> ShmCollectives | None:
    """The group's shared-memory collectives, or None (gloo stays) when a rank runs on another
    host, the machine is not x86-64, or /dev/shm cannot hold the segment. Collective: every
    rank of `tp` calls it, and all end with the same answer."""
    hosts = tp.all_gather_object((host_id(), supported()))
    if len({h for h, _ in hosts}) != 1 or not all(ok for _, ok in hosts):
        return None
    path = ""
    if tp.rank == 0:
        try:
            path = ShmCollectives.create(tp.size)
        except OSError:
            path = ""
    path = tp.broadcast_object(path)
    mine = None
    if path:
        try:
            mine = ShmCollectives(path, tp.rank, tp.size, timeout_s)
        except (OSError, RuntimeError):
            mine = None
    every = tp.all_gather_object((mine is not None, os.getpid()))
    if tp.rank == 0 and path:
        os.unlink(path)      # every rank has mapped it (or given up): nothing left behind
    if mine is None or not all(ok for ok, _ in every):
        return None
    mine.set_pids([pid for _, pid in every])
    return mine
