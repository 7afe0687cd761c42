"""The memory plan: hand-computed numbers for internlm2-chat-20b on 8 x 910B (64 GiB, fp16), and
agreement with what the engine's plan_cache finds for real models (tiny checkpoints) at tp 1/2
and with the parameters InternLM2Model allocates at every valid tp."""
from __future__ import annotations

import importlib.util
from dataclasses import asdict
import sys

import pytest
import torch

from _mp import run_ranks
from conftest import ROOT
from internlm2_tp.config import ConfigError, ModelConfig
from internlm2_tp.engine.config import EngineConfig
from internlm2_tp.engine.engine import plan_cache
from internlm2_tp.tools.memory_plan import GiB, plan, preset, weight_params
from internlm2_tp.model import InternLM2Model
from internlm2_tp.parallel.group import TPGroup

# 48 q heads over 8 KV heads as the 20B; vocab 1000 is not a multiple of 16 (padded rows).
SPEC = dict(dtype="float32", hidden_size=192, num_attention_heads=48, num_key_value_heads=8,
            intermediate_size=256, num_hidden_layers=2, vocab_size=1000)
KV_GB = 1 / 1024        # engine.kv_cache_gb: exactly 1 MiB, so both sides divide the same bytes


def test_20b_tp8_fp16_on_64gb_by_hand() -> None:
    p = plan(preset("internlm2-chat-20b"), tp=8, dtype_bytes=2, device_bytes=64 * GiB)
    # per layer: wqkv (6 q + 1 k + 1 v heads) * 128 * 6144 = 6,291,456; wo 6144 * 768 =
    # 4,718,592; w1|w3 2 * 2048 * 6144 = 25,165,824; w2 6144 * 2048 = 12,582,912
    assert p.params["layers"] == 48 * 48_758_784 == 2_340_421_632
    assert p.params["norms"] == (2 * 48 + 1) * 6144 == 595_968          # replicated
    assert p.params["embedding"] == p.params["output"] == 92544 // 8 * 6144 == 71_073_792
    assert p.weight_bytes == 2 * 2_483_165_184 == 4_966_330_368       # 4.625 GiB per rank
    assert p.kv_heads_local == 1
    assert p.kv_bytes_per_token == 2 * 48 * 1 * 128 * 2 == 24_576
    # 0.9 * (68,719,476,736 - 4,966,330,368) = 57,377,831,731.2 B of cache per rank;
    # one 128-token block is 24,576 * 128 = 3,145,728 B -> 18,239 blocks
    assert p.kv_budget_bytes == 57_377_831_731
    assert p.num_blocks == 18_239 and p.cache_tokens == 2_334_592
    assert p.context_len == 32768 * 3 and p.max_model_len == 98_304      # dynamic NTK, factor 3
    assert [p.max_seqs(n) for n in (2048, 4096, 8192, 32768)] == [1139, 569, 284, 71]
    text = p.describe()
    for s in ("4.625 GiB", "24,576 B", "18,239 blocks x 128 = 2,334,592 tokens", "569"):
        assert s in text, s


def test_kv_heads_replicated_past_8() -> None:
    cfg = preset("internlm2-chat-20b")
    per_tok = {tp: plan(cfg, tp, 2, 64 * GiB).kv_bytes_per_token for tp in (1, 2, 4, 8, 16, 48)}
    assert per_tok == {1: 8 * 24_576, 2: 4 * 24_576, 4: 2 * 24_576, 8: 24_576, 16: 24_576,
                       48: 24_576}
    p16 = plan(cfg, 16, 2, 64 * GiB)
    assert "replicated over tp/8 = 2 ranks" in p16.describe()
    # at tp=16 each rank still reads its group's k and v rows: 3 q + 1 k + 1 v heads
    assert weight_params(cfg, 16)["layers"] == 48 * ((3 + 2) * 128 * 6144 + 6144 * 384
                                                     + 2 * 1024 * 6144 + 6144 * 1024)


def test_presets_and_errors() -> None:
    assert preset("internlm2-chat-7b").num_hidden_layers == 32
    assert preset("internlm2-1_8b").rope_scaling is None
    with pytest.raises(ValueError, match="preset='internlm2-30b'"):
        preset("internlm2-30b")
    with pytest.raises(ConfigError, match="parallel.tp"):
        plan(preset("internlm2-chat-7b"), 3, 2, 64 * GiB)
    with pytest.raises(ValueError, match="raise parallel.tp"):
        plan(preset("internlm2-chat-20b"), 1, 2, 32 * GiB)      # 37 GiB of weights
    with pytest.raises(ValueError, match="utilization"):
        plan(preset("internlm2-chat-20b"), 8, 2, 64 * GiB, utilization=1.5)


def test_internlm2_5_presets() -> None:
    """The 2.5 chat models: the 2.0 shapes with their own RoPE settings. The 1M model's KV cache
    is 128 KiB per token in bf16 over the whole group (32 layers x 8 KV heads x 128 x 2 x 2 B)."""
    one_m = preset("internlm2_5-7b-chat-1m")
    assert (one_m.rope_theta, one_m.rope_scaling.factor, one_m.max_position_embeddings) == \
        (5e7, 2.5, 262144)
    p = plan(one_m, tp=8, dtype_bytes=2, device_bytes=64 * GiB)
    assert p.kv_bytes_per_token * 8 == 128 * 1024 and p.context_len == 655360
    big = preset("internlm2_5-20b-chat")
    assert (big.rope_theta, big.rope_scaling.factor, big.num_hidden_layers) == (5e7, 2.5, 48)
    chat = preset("internlm2_5-7b-chat")
    assert (chat.rope_theta, chat.rope_scaling.factor, chat.max_position_embeddings) == \
        (1e6, 2.0, 32768)
    assert weight_params(chat, 2) == weight_params(preset("internlm2-chat-7b"), 2)


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_weights_equal_the_model_parameters(make_ckpt, tp: int) -> None:
    cfg = ModelConfig.from_dir(make_ckpt(**SPEC))
    for rank in range(tp):  # every rank allocates the same shapes (vocab padding included)
        model = InternLM2Model(cfg, TPGroup(rank=rank, size=tp), torch.float32, torch.device("cpu"))
        got = sum(p.numel() for p in model.parameters())
        assert got == sum(weight_params(cfg, tp).values()), (tp, rank)


def _rank_facts(rank: int, world: int, port: int, ckpt: str) -> dict:
    from _ranks import build_model

    model = build_model(rank, world, port, ckpt)          # loaded: every parameter asserted
    facts = plan_cache(model, EngineConfig(block_size=16, kv_cache_gb=KV_GB), (2,))
    return asdict(facts)


@pytest.mark.slow   # ranks as processes (gloo)
@pytest.mark.parametrize("tp", [1, 2])
def test_agrees_with_engine_plan_cache(make_ckpt, tp: int) -> None:
    ckpt = make_ckpt(**SPEC)
    facts = run_ranks(_rank_facts, tp, str(ckpt)) if tp > 1 else [_rank_facts(0, 1, 0, str(ckpt))]
    cfg = ModelConfig.from_dir(ckpt)
    for f in facts:
        # the engine takes 0.9 x the free memory after loading; with utilization 1 and a device
        # of exactly weights + budget, the plan must land on the engine's numbers
        p = plan(cfg, tp, 4, f["weight_bytes"] + int(KV_GB * GiB), utilization=1.0,
                 block_size=16)
        assert (p.weight_bytes, p.kv_bytes_per_token, p.num_blocks, p.max_model_len) == (
            f["weight_bytes"], f["kv_bytes_per_token"], f["num_blocks"], f["max_model_len"])


def _cli():
    spec = importlib.util.spec_from_file_location("memory_plan_cli", ROOT / "jobs" / "memory_plan.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while defining
    spec.loader.exec_module(mod)
    return mod


def test_cli(make_ckpt, capsys) -> None:
    from internlm2_tp.job_config import JobConfigError

    cli = _cli()
    assert cli.main(["preset=internlm2-chat-20b", "parallel.tp=8", "device_gb=64",
                     "dtype=float16"]) == 0
    out = capsys.readouterr().out
    assert "18,239 blocks x 128 = 2,334,592 tokens" in out and "dtype float16" in out
    ckpt = make_ckpt(**SPEC)
    assert cli.main([f"model.path={ckpt}", "parallel.tp=2", "device_gb=1", "block_size=16"]) == 0
    assert "tp=2, 4 B/param" in capsys.readouterr().out      # dtype auto: the checkpoint's fp32
    for argv, msg in [(["parallel.tp=8"], "exactly one of model.path"),
                      (["preset=internlm2-chat-20b", "parallel.tpp=8"], "parallel.tpp"),
                      (["preset=internlm2-chat-20b", "dtype=int4"], "dtype"),
                      (["preset=internlm2-chat-20b", "device_gb=4"], "raise parallel.tp")]:
        with pytest.raises(JobConfigError, match=msg):
            cli.main(argv)
