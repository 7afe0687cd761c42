"""Shared-memory collectives for CPU ranks on one host: the same results as gloo, bitwise the
same on every rank, chunked past a slot, bounded waits, nothing left in /dev/shm."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from _mp import run_ranks
from internlm2_tp.parallel import shm as shm_mod
from internlm2_tp.parallel.group import destroy_tp_group, init_tp_group

pytestmark = [pytest.mark.skipif(not shm_mod.supported(), reason="shared-memory collectives "
                                 "run only on x86-64 Linux with /dev/shm"),
              pytest.mark.slow]   # every test starts rank processes


def rank_compare(rank: int, world: int, port: int, budget: int) -> dict:
    shm_mod.BUDGET = budget           # small slots: the larger tensors go in several chunks
    tp = init_tp_group("cpu", rank, world, "127.0.0.1", port)
    assert tp.shm is not None
    out = {"same_as_gloo": [], "chunks": tp.shm.chunk}
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1, 7, 1536, 64 * 1536, 300_001):
            g = torch.Generator().manual_seed(1000 * rank + n)
            x = torch.randn(n, generator=g).to(dtype)
            ref = x.clone()
            dist.all_reduce(ref)
            got = tp.all_reduce(x.clone())
            out["same_as_gloo"].append(torch.equal(got, ref) if world == 2 else
                                       bool(torch.allclose(got.float(), ref.float(),
                                                           rtol=2e-2, atol=2e-2)))
            out.setdefault("results", []).append(got)
    part = torch.full((3, 2), float(rank), dtype=torch.float64)
    out["gather"] = tp.all_gather_last(part)
    destroy_tp_group(tp)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_shm_collectives_match_gloo_and_agree_across_ranks(world):
    before = set(os.listdir("/dev/shm"))
    outs = run_ranks(rank_compare, world, 64 << 10)
    assert set(os.listdir("/dev/shm")) - before == set()   # unlinked once every rank mapped it
    assert outs[0]["chunks"] * 2 * world <= 64 << 10
    for o in outs:
        assert all(o["same_as_gloo"]), o["same_as_gloo"]
        assert torch.equal(o["gather"], torch.arange(world, dtype=torch.float64)
                           .repeat_interleave(2).expand(3, -1))
    for a, b in zip(outs[0]["results"], outs[-1]["results"]):
        assert torch.equal(a, b)      # every rank bitwise the same


def rank_stall(rank: int, world: int, port: int) -> str:
    tp = init_tp_group("cpu", rank, world, "127.0.0.1", port, timeout_s=2.0)
    assert tp.shm is not None
    if rank == 1:
        time.sleep(4.0)               # never joins the collective in time
        return "slept"
    t0 = time.monotonic()
    try:
        tp.all_reduce(torch.ones(4))
    except RuntimeError as e:
        return f"{e} after {time.monotonic() - t0:.1f}s"
    return "returned"


def test_a_silent_rank_fails_the_wait_within_the_timeout():
    msg = run_ranks(rank_stall, 2)[0]
    assert "timed out after 2s waiting for rank 1" in msg
    assert 1.9 < float(msg.rsplit(" after ", 1)[1].rstrip("s")) < 4.0


def rank_off(rank: int, world: int, port: int) -> bool:
    os.environ["INTERNLM2TP_SHM_COLLECTIVES"] = "0"
    tp = init_tp_group("cpu", rank, world, "127.0.0.1", port)
    off = tp.shm is None and torch.equal(tp.all_reduce(torch.ones(3)), torch.full((3,), 2.0))
    destroy_tp_group(tp)
    return off


def test_the_switch_keeps_gloo():
    assert run_ranks(rank_off, 2) == [True, True]
