"""Issue 3: the engine under continuous batching is token-exact with one-row-at-a-time decoding."""
from __future__ import annotations

import pytest
import torch

from _mp import run_ranks
from _ranks import build_model, prefill_logits, rank_generate
from internlm2_tp.engine.params import SamplingParams
from reference import ref_greedy

pytestmark = pytest.mark.slow   # the engine on ranks as processes (gloo)

SPEC = dict(dtype="float32", hidden_size=192, num_attention_heads=48, num_key_value_heads=8,
            intermediate_size=256, num_hidden_layers=2, vocab_size=1000)

LENGTHS = [3, 45, 7, 20, 33, 5, 12, 28]
NEW = [12, 6, 20, 9, 15, 17, 8, 11]
# Tiny cache (forces preemption), few sequences in flight (rows join while others decode),
# a small token budget (a 45-token prompt is prefilled in chunks).
TIGHT = dict(block_size=4, max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=18)


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 1000, (n - 1,), generator=g).tolist() for n in LENGTHS]


def greedy_requests() -> list:
    return [(i, p, SamplingParams(max_new_tokens=n, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts(), NEW))]


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(**SPEC)


@pytest.fixture(scope="module")
def one_at_a_time(ckpt) -> dict[int, list[int]]:
    """Reference: each row alone, every step a full recompute of its whole sequence."""
    model = build_model(0, 1, 0, ckpt)
    out = {}
    for rid, prompt, params in greedy_requests():
        ids = list(prompt)
        for _ in range(params.max_new_tokens):
            ids.append(int(prefill_logits(model, [ids])[-1].argmax()))
        out[rid] = ids[len(prompt):]
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_continuous_batching_greedy_token_exact(ckpt, one_at_a_time, tp):
    results, stats = run_ranks(rank_generate, tp, str(ckpt), greedy_requests(), TIGHT)[0]
    assert stats["preemptions"] > 0, "the tiny cache should have forced a preemption"
    for rid, tokens, reason in results:
        assert reason == "length"
        assert tokens == one_at_a_time[rid], f"row {rid} differs at tp={tp}"


def _sampled_requests(rows: list[int]) -> list:
    ps = prompts(1)
    return [(i, ps[i], SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50,
                                      seed=1000 + i, ignore_eos=True)) for i in rows]


def test_seeded_sampling_independent_of_batch_and_tp(ckpt):
    a, _ = run_ranks(rank_generate, 1, str(ckpt), _sampled_requests(list(range(8))), TIGHT)[0]
    b, _ = run_ranks(rank_generate, 2, str(ckpt), _sampled_requests(list(range(8))), TIGHT)[0]
    c, _ = run_ranks(rank_generate, 1, str(ckpt), _sampled_requests([6, 2, 5]),
                     dict(block_size=16))[0]
    by_id = {rid: toks for rid, toks, _ in a}
    assert len({tuple(t) for t in by_id.values()}) == 8
    assert {rid: toks for rid, toks, _ in b} == by_id
    for rid, toks, _ in c:
        assert toks == by_id[rid]


def test_dynamic_ntk_matches_official_rule(make_ckpt):
    ckpt = make_ckpt(**SPEC, max_position_embeddings=64,
                     rope_scaling={"type": "dynamic", "factor": 2.0})
    g = torch.Generator().manual_seed(5)
    ps = [[1] + torch.randint(3, 1000, (n - 1,), generator=g).tolist() for n in (40, 64, 100)]
    reqs = [(i, p, SamplingParams(max_new_tokens=32, ignore_eos=True)) for i, p in enumerate(ps)]
    # chunked prefill and a batch of all three: neither may change a row's rotation
    results, _ = run_ranks(rank_generate, 1, str(ckpt), reqs,
                           dict(block_size=8, max_num_batched_tokens=24, max_model_len=256))[0]
    for rid, toks, _ in results:
        assert toks == ref_greedy(ckpt, ps[rid], 32), f"prompt of {len(ps[rid])} tokens"


def test_prefix_cache_reuses_blocks_and_changes_nothing(ckpt):
    system = prompts(2)[1][:40]
    reqs = [(i, system + p[1:6], SamplingParams(max_new_tokens=8, ignore_eos=True))
            for i, p in enumerate(prompts(3))]
    kw = dict(block_size=4, max_num_seqs=2)
    on, stats_on = run_ranks(rank_generate, 1, str(ckpt), reqs, kw)[0]
    off, stats_off = run_ranks(rank_generate, 1, str(ckpt), reqs,
                               dict(kw, enable_prefix_caching=False))[0]
    assert stats_off["prefix_hits"] == 0
    # row 0 computes the 40-token system prompt's 10 blocks; rows 1..7 each reuse them (row 1,
    # which arrives with row 0, is held back one step rather than computing them a second time)
    assert stats_on["prefix_hits"] == 7 * 40
    assert on == off


def test_burst_with_shared_prefix_computes_it_once(ckpt):
    """All rows arrive together and fit in one step: without holding the sharers back each would
    compute the system prompt (vLLM's and lmdeploy's prefix caches only serve computed blocks).
    Rows that do not share it are admitted at once, and outputs do not change."""
    system = prompts(4)[1][:32]
    own = prompts(5)
    reqs = [(i, (system + p[1:9]) if i % 2 else p, SamplingParams(max_new_tokens=6,
                                                                  ignore_eos=True))
            for i, p in enumerate(own)]
    kw = dict(block_size=4, max_num_seqs=8, max_num_batched_tokens=512)
    on, stats_on = run_ranks(rank_generate, 1, str(ckpt), reqs, kw)[0]
    off, stats_off = run_ranks(rank_generate, 1, str(ckpt), reqs,
                               dict(kw, enable_prefix_caching=False))[0]
    assert on == off
    assert stats_on["prefix_hits"] == 3 * 32   # 4 sharers: the first computes, 3 reuse
    assert stats_on["steps"] == stats_off["steps"] + 1  # the sharers start one step later


def test_cache_blocks_are_zeroed_before_their_first_use(ckpt, one_at_a_time, monkeypatch):
    """The cache is allocated uninitialized (memory only for the blocks a run uses); attention
    reads whole blocks, so a block must be zeroed when first handed out: a cache that starts
    out full of NaN gives the same tokens."""
    from _ranks import build_model
    from internlm2_tp.engine import engine as engine_mod
    from internlm2_tp.engine.engine import Engine, EngineConfig

    real = engine_mod.allocate_kv_caches

    def poisoned(*args, **kw):
        caches = real(*args, **kw)
        for k, v in caches:
            k.fill_(float("nan"))
            v.fill_(float("nan"))
        return caches

    monkeypatch.setattr(engine_mod, "allocate_kv_caches", poisoned)
    eng = Engine(build_model(0, 1, 0, ckpt), EngineConfig(**TIGHT), (2,))
    for f in eng.generate(greedy_requests()):
        assert f.output_ids == one_at_a_time[f.request_id], f"row {f.request_id}"
    assert 0 < eng.blocks.high_water <= TIGHT["num_kv_blocks"]
