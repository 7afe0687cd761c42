"""Long prompts through the engine, token-exact with a full-recompute reference written from the
official math (tests/reference.py), at tp 1 and 2: two prompts of many chunks past the config's
context (dynamic NTK) on a cache too small for both (the younger is preempted and recomputed),
then a copy of the first, which continues its cached prefix (a prefix-cache hit of all but its
last block; past the context a prefix is shared only by prompts of the same length, whose keys
rotate alike). Every chunk after a prompt's first runs the plain backend's continuation path
(the cached prefix in tiles, merged by log-sum-exp)."""
from __future__ import annotations

import pytest
import torch

from _mp import run_ranks
from _ranks import rank_generate
from internlm2_tp.engine.params import SamplingParams
from reference import ref_greedy

pytestmark = pytest.mark.slow   # the engine on ranks as processes (gloo)

# the test model scaled down: 16 q / 8 KV heads of dim 16, 256 positions, dynamic NTK 2
SPEC = dict(dtype="float32", hidden_size=256, num_attention_heads=16, num_key_value_heads=8,
            intermediate_size=256, num_hidden_layers=2, vocab_size=1000,
            max_position_embeddings=256, rope_scaling={"type": "dynamic", "factor": 2.0})
NEW = 5
# 16-token blocks, 96 tokens a step (the first prompt takes 11 chunks); 101 blocks hold both
# prompts (63 + 38) but not the first's first generated token: the second is preempted.
ENGINE = dict(block_size=16, max_num_seqs=3, max_num_batched_tokens=96, num_kv_blocks=101,
              max_model_len=2048)


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(**SPEC)


@pytest.fixture(scope="module")
def cases(ckpt) -> tuple[list, dict[int, list[int]]]:
    g = torch.Generator().manual_seed(11)
    ids = lambda n: torch.randint(3, 1000, (n,), generator=g).tolist()  # noqa: E731
    first = [1] + ids(1007)
    prompts = [first, [1] + ids(599), first]
    reqs = [(i, p, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
            for i, p in enumerate(prompts)]
    want = {i: ref_greedy(ckpt, p, NEW) for i, p in enumerate(prompts[:2])}
    return reqs, {**want, 2: want[0]}


@pytest.mark.parametrize("tp", [1, 2])
def test_long_prompts_past_the_context_are_token_exact(ckpt, cases, tp: int) -> None:
    reqs, want = cases
    results, stats = run_ranks(rank_generate, tp, str(ckpt), reqs, ENGINE)[0]
    assert stats["preemptions"] > 0 and stats["prefix_hits"] >= 62 * 16, stats
    for rid, tokens, _ in results:
        assert tokens == want[rid], f"row {rid} ({len(reqs[rid][1])} tokens) at tp={tp}"
