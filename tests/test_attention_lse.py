"""Attention pieces with their log-sum-exp (internlm2_tp/attention/lse.py): the fused kernel
and the torch route give the softmax and its lse of a naive computation, and pieces over split
key sets merge into the unsplit result, in fp32 at the suite's tight tolerances."""
from __future__ import annotations

import pytest
import torch

from _npu_ranks import rnd
from internlm2_tp.attention.lse import attend, attend_torch, merge

TIGHT = dict(rtol=1e-5, atol=1e-5)


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale                         # [B, H, L, S]
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.matmul(s.softmax(-1), v), torch.logsumexp(s, -1)


@pytest.mark.parametrize("causal", [False, True], ids=["prefix", "causal"])
@pytest.mark.parametrize("route", ["fused", "torch-rows"])
def test_attend_gives_the_softmax_and_its_lse(route: str, causal: bool) -> None:
    n, s = 70, 70 if causal else 300
    q, k, v = rnd(2, 8, n, 32, seed=1), rnd(2, 4, s, 32, seed=2), rnd(2, 4, s, 32, seed=3)
    if route == "fused":
        o, lse = attend(q, k, v, causal, 0.3)
    else:   # 3 query rows of scores per block: many blocks, the causal cut in each
        o, lse = attend_torch(q, k, v, causal, 0.3, score_bytes=3 * 2 * 8 * s * 4)
    want_o, want_lse = naive(q, k, v, causal, 0.3)
    torch.testing.assert_close(o, want_o, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)


def test_pieces_over_split_keys_merge_into_one_call() -> None:
    """1000 keys in pieces of 128, 5 and the rest, merged in any order = one call over all."""
    q, k, v = rnd(1, 8, 40, 32, seed=4), rnd(1, 2, 1000, 32, seed=5), rnd(1, 2, 1000, 32, seed=6)
    want_o, want_lse = attend(q, k, v, False, 0.2)
    for cuts in ([0, 128, 133, 1000], [0, 867, 872, 1000]):
        acc, total = attend(q, k[:, :, :cuts[1]], v[:, :, :cuts[1]], False, 0.2)
        for a, b in zip(cuts[1:], cuts[2:]):
            acc, total = merge(acc.float(), total, *attend(q, k[:, :, a:b], v[:, :, a:b],
                                                            False, 0.2))
        torch.testing.assert_close(acc, want_o, **TIGHT)
        torch.testing.assert_close(total, want_lse, **TIGHT)
