"""Issue 17: log-probabilities (engine/scoring.py, parallel/logprobs.py) against transformers'
LlamaForCausalLM on the converted checkpoint, at tp 1 and 2, through chunked prefill and the
prefix cache; n samples per request sharing the prompt's blocks."""
from __future__ import annotations

import pytest
import torch

from _mp import run_ranks
from _ranks import rank_finished
from internlm2_tp.engine.params import SamplingParams

pytestmark = pytest.mark.slow   # the engine on ranks as processes (gloo)

# vocab 1001: not a multiple of tp 2, so the head's padding column is exercised.
SPEC = dict(dtype="float32", hidden_size=192, num_attention_heads=48, num_key_value_heads=8,
            intermediate_size=256, num_hidden_layers=2, vocab_size=1001)
# 40-token prompts are prefilled in 16-token chunks; blocks of 4 tokens.
KW = dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=64)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    shared = [1] + torch.randint(3, 1001, (23,), generator=g).tolist()
    tails = [torch.randint(3, 1001, (n,), generator=g).tolist() for n in (16, 9, 11, 6)]
    return [shared + tails[0], shared + tails[1], shared + tails[2], [1] + tails[3]]


def _requests() -> list:
    a, b, c, d = _prompts()
    return [
        # longer than the token budget (chunked), scored, greedy with the top 5
        ("long", a, SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=5,
                                   prompt_logprobs=True)),
        # shares 24 tokens with "long": its full blocks come from the prefix cache
        ("cached", b, SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=3)),
        # the same shared prefix, scored: computed in full, not taken from the cache
        ("rescored", c, SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=0,
                                       prompt_logprobs=True)),
        # sampled: log-probabilities are the model's, before temperature and filters
        ("sampled", d, SamplingParams(max_new_tokens=5, ignore_eos=True, temperature=1.5,
                                      top_k=20, logprobs=2, seed=3)),
        # scoring only
        ("score", a[:30], SamplingParams(max_new_tokens=0, prompt_logprobs=True)),
    ]


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(**SPEC)


@pytest.fixture(scope="module")
def hf(ckpt, tmp_path_factory):
    from transformers import LlamaForCausalLM

    from internlm2_tp.tools.convert import convert

    out = tmp_path_factory.mktemp("llama") / "llama"
    convert("llama", ckpt, out)
    return LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()


def _ref_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)  # [T, V]


@pytest.fixture(scope="module")
def runs(ckpt) -> dict[int, list]:
    """One process group per tp runs every engine of this file (one model load each): the
    log-probability requests, the n-sample requests and (tp 1) a partial rerun of those."""
    n_reqs = _n_requests()
    rerun = (n_reqs[::-1], {0: (3, 1), 2: (2,)}, KW)   # the missing samples only, another batch
    return {tp: run_ranks(rank_finished, tp, str(ckpt),
                          [(_requests(), None, KW), (n_reqs, None, KW)] + [rerun] * (tp == 1))[0]
            for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_logprobs_match_transformers(runs, hf, tp):
    done, stats = runs[tp][0]
    by_id = {f.request_id: f for f in done}
    assert set(by_id) == {r[0] for r in _requests()}
    assert stats["prefix_hits"] >= 20           # "cached" took the shared blocks from the cache
    for rid, prompt, params in _requests():
        f = by_id[rid]
        lsm = _ref_logprobs(hf, prompt + f.output_ids)
        n, out = len(prompt), f.output_ids
        assert len(out) == params.max_new_tokens, rid
        if params.logprobs >= 0:
            want = lsm[torch.arange(n - 1, n - 1 + len(out)), torch.tensor(out)]
            torch.testing.assert_close(torch.tensor(f.token_logprobs), want, atol=1e-4, rtol=0)
        else:
            assert f.token_logprobs is None
        if params.logprobs > 0:
            top = torch.topk(lsm[n - 1:n - 1 + len(out)], params.logprobs, dim=-1)
            assert [[t for t, _ in pos] for pos in f.top_logprobs] == top.indices.tolist(), rid
            got = torch.tensor([[v for _, v in pos] for pos in f.top_logprobs])
            torch.testing.assert_close(got, top.values, atol=1e-4, rtol=0)
        else:
            assert f.top_logprobs is None
        if params.prompt_logprobs:
            assert f.prompt_logprobs[0] is None and len(f.prompt_logprobs) == n
            want = lsm[torch.arange(n - 1), torch.tensor(prompt[1:])]
            torch.testing.assert_close(torch.tensor(f.prompt_logprobs[1:]), want, atol=1e-4,
                                       rtol=0)
        else:
            assert f.prompt_logprobs is None
    assert by_id["score"].finish_reason == "length" and by_id["score"].output_ids == []


def _n_requests() -> list:
    g = torch.Generator().manual_seed(11)
    return [(i, [1] + torch.randint(3, 1001, (n,), generator=g).tolist(),
             SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1.0, n=4, seed=i,
                            logprobs=1))
            for i, n in enumerate((21, 7, 30))]


def test_n_samples_share_the_prompt_and_do_not_depend_on_tp_or_resume(runs):
    reqs = _n_requests()
    (a, sa), (c, _) = runs[1][1:]
    b, _ = runs[2][1]

    def key(done):
        return {(f.request_id, f.sample_index): f.output_ids for f in done}

    ka = key(a)
    assert sorted(ka) == [(i, s) for i in range(3) for s in range(4)]
    assert key(b) == ka
    assert {k: v for k, v in key(c).items() if k[0] != 1} == {k: ka[k] for k in
                                                             [(0, 3), (0, 1), (2, 2)]}
    assert key(c)[(1, 0)] == ka[(1, 0)]
    assert len({tuple(ka[(i, s)]) for i in range(3) for s in range(4)}) == 12   # seeds differ
    # the prompt is computed once: each sibling recomputes only its prompt's last partial block
    prompt_lens = [len(p) for _, p, _ in reqs]
    tails = sum(3 * (n - (n - 1) // 4 * 4) for n in prompt_lens)
    decodes = sum(4 * 5 for _ in reqs)     # 6 new tokens: the first comes from the prefill
    assert sa["tokens_computed"] == sum(prompt_lens) + tails + decodes
