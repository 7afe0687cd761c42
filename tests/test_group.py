"""The tensor-parallel group's agreement: what ranks learn from their own device becomes one
decision for the group (the engine's KV blocks, the worker's dtype)."""
from __future__ import annotations

import pytest
import torch

from _mp import run_ranks
from _npu_ranks import rank_agree
from internlm2_tp.parallel.group import TPGroup


@pytest.mark.slow   # ranks as processes (gloo)
def test_two_ranks_agree_on_the_smallest_blocks_and_the_widest_dtype() -> None:
    for blocks, dtype, same in run_ranks(rank_agree, 2):
        assert blocks == (100, [100, 107])
        assert dtype == torch.float32 and same == torch.bfloat16


def test_a_group_of_one_agrees_with_itself() -> None:
    assert TPGroup().agree_min(42) == (42, [42])
    assert TPGroup().all_gather_object("x") == ["x"]
