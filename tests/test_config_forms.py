"""The InternLM2 family's config.json forms: InternLM2.5's RoPE settings (greedy tokens past
max_position_embeddings against the official dynamic-NTK rule), `model_type: internlm`, and the
early internlm2-7b revision's `rotary` dict."""
from __future__ import annotations

import json

import pytest
import torch

from internlm2_tp.config import ModelConfig, RopeScaling
from internlm2_tp.errors import ConfigError
from internlm2_tp.testing.tiny import TinySpec, config_json

# internlm2_5-20b-chat and -7b-chat-1m: rope_theta 5e7, dynamic NTK factor 2.5 (tiny weights;
# max_position_embeddings cut to 64 so that a CPU test reaches past it). head_dim 32: with the
# usual tiny head_dim of 4 the base moves only one frequency, and the tokens do not change.
V2_5 = dict(dtype="float32", hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=256, num_hidden_layers=2, vocab_size=1000,
            max_position_embeddings=64, rope_theta=5e7,
            rope_scaling={"type": "dynamic", "factor": 2.5})


def _raw(**extra) -> dict:
    return {**config_json(TinySpec(), 1000), **extra}


@pytest.fixture(scope="module")
def reference_tokens(make_ckpt) -> dict[str, list[list[int]]]:
    """Greedy tokens by the reference (full recompute, the official rule), computed once: of
    the 2.5 settings, and of the same weights without rope_scaling."""
    from reference import ref_greedy

    scaled, plain = make_ckpt(**V2_5), make_ckpt(**{**V2_5, "rope_scaling": None})
    return {"scaled": [ref_greedy(scaled, p, NEW) for p in _prompts()],
            "plain": [ref_greedy(plain, p, NEW) for p in _prompts()]}


@pytest.mark.slow
def test_internlm2_5_rope_past_max_position_embeddings(make_ckpt, reference_tokens):
    """At tp 1: the rotation is the same on every rank (tp-exactness: test_model, test_engine)."""
    from _mp import run_ranks
    from _ranks import rank_generate
    from internlm2_tp.engine.params import SamplingParams

    ckpt = make_ckpt(**V2_5)
    cfg = ModelConfig.from_dir(ckpt)
    assert cfg.rope_theta == 5e7 and cfg.rope_scaling == RopeScaling("dynamic", 2.5)
    reqs = [(i, p, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
            for i, p in enumerate(_prompts())]
    results, _ = run_ranks(rank_generate, 1, str(ckpt), reqs,
                           dict(block_size=8, max_num_batched_tokens=32, max_model_len=256))[0]
    for rid, toks, _ in results:   # row 0 crosses 64 while generating, row 1 starts past it
        assert toks == reference_tokens["scaled"][rid], f"prompt of {len(reqs[rid][1])}"


NEW = 40


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(3, 1000, (n - 1,), generator=g).tolist() for n in (44, 90)]


@pytest.mark.slow
def test_the_2_5_scaling_changes_those_tokens(reference_tokens):
    """The same weights without rope_scaling give other tokens: the test above can tell."""
    for scaled, plain in zip(reference_tokens["scaled"], reference_tokens["plain"]):
        assert scaled != plain


def test_model_type_internlm_needs_an_internlm2_architecture():
    assert ModelConfig.from_dict(_raw(model_type="internlm")).layout == "internlm2"
    reward = _raw(model_type="internlm", architectures=["InternLM2ForRewardModel"],
                  reward_token_id=7)
    assert ModelConfig.from_dict(reward).task == "reward"
    for archs in (None, ["InternLMForCausalLM"]):
        with pytest.raises(ConfigError, match="model_type 'internlm' is read as InternLM2 only"):
            ModelConfig.from_dict(_raw(model_type="internlm", architectures=archs))
    with pytest.raises(ConfigError, match="model_type 'qwen2'"):
        ModelConfig.from_dict(_raw(model_type="qwen2"))


def test_old_rotary_dict_reads_as_rope_theta_and_scaling():
    new = ModelConfig.from_dict(_raw(rope_theta=1e6,
                                     rope_scaling={"type": "dynamic", "factor": 1.0}))
    old = _raw(rope_scaling=None, rotary={"base": 1000000, "type": "dynamic"})
    del old["rope_theta"]
    assert ModelConfig.from_dict(old) == new                 # scaling_factor defaults to 1.0
    old["rotary"] = {"base": 5e7, "type": "dynamic", "scaling_factor": 2.5}
    assert ModelConfig.from_dict(old) == ModelConfig.from_dict(
        _raw(rope_theta=5e7, rope_scaling={"type": "dynamic", "factor": 2.5}))
    origin = {**old, "rotary": {"base": 1e6, "type": "origin"}}
    assert ModelConfig.from_dict(origin).rope_scaling is None
    same = {**old, "rope_theta": 5e7, "rope_scaling": {"type": "dynamic", "factor": 2.5}}
    assert ModelConfig.from_dict(same).rope_theta == 5e7     # both forms, one meaning


@pytest.mark.parametrize("rotary, extra, expect", [
    ({"base": 1e6, "type": "linear"}, {}, "rotary.type must be 'origin' or 'dynamic'"),
    ({"base": 1e6, "type": "dynamic", "alpha": 2}, {}, "rotary.alpha has no known meaning"),
    ({"type": "dynamic"}, {}, "rotary must be a dict with a 'base'"),
    ({"base": 1e6, "type": "origin", "scaling_factor": 2}, {}, "rotary.scaling_factor"),
    ({"base": 1e6, "type": "dynamic"}, {"rope_theta": 1e4}, "rotary.base 1000000.0 and rope_theta"),
    ({"base": 1e6, "type": "dynamic", "scaling_factor": 2.0},
     {"rope_scaling": {"type": "dynamic", "factor": 3.0}}, "and rope_scaling"),
])
def test_old_rotary_dict_refused_when_it_means_something_else(rotary, extra, expect):
    raw = _raw(rope_scaling=None, rotary=rotary)
    del raw["rope_theta"]
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(")):
        ModelConfig.from_dict({**raw, **extra})


def test_published_2_5_configs_read(tmp_path):
    """The 7b-chat-1m's config.json fields as published (tiny sizes aside) through from_dir."""
    raw = _raw(rope_theta=50000000, max_position_embeddings=262144,
               rope_scaling={"type": "dynamic", "factor": 2.5}, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_dir(tmp_path)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling.factor) == \
        (5e7, 262144, 2.5)
