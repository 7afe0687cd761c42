"""The benchmark's roofline: the work a run executes, counted by hand, by the ideal model and by
the engine itself; the bound it gives; the report's targets."""
from __future__ import annotations

import pytest
import torch

from internlm2_tp.bench import flops_per_token, make_prompts
from internlm2_tp.bench.report import targets
from internlm2_tp.bench.roofline import (GemmRates, Machine, Shape, gemm_rates, gemm_seconds,
                                         prefix_hits, run_work, work_bytes, work_flops)
from internlm2_tp.config import ModelConfig
from internlm2_tp.engine.sampler import SamplingParams
from internlm2_tp.engine.work import RunWork

SPEC = dict(dtype="float32", hidden_size=192, num_attention_heads=48, num_key_value_heads=8,
            intermediate_size=256, num_hidden_layers=2, vocab_size=1000)
SHAPE = Shape(hidden=8, heads=4, kv_heads=2, head_dim=2, intermediate=16, layers=3, vocab=50,
              itemsize=2)


def test_shape_counts_every_matmul_weight():
    # wqkv (4 + 2*2) * 2 * 8, wo 4 * 2 * 8, w1|w3|w2 3 * 8 * 16
    assert SHAPE.layer_weights == 128 + 64 + 384
    assert SHAPE.weight_bytes == (3 * 576 + 50 * 8) * 2
    assert SHAPE.kv_bytes_per_token == 2 * 3 * 2 * 2 * 2
    assert SHAPE.weight_flops_per_output_token() == 2 * (3 * 576 + 400)


def test_run_work_by_hand():
    # One row: a 5-token prompt with 4 tokens cached, 3 new tokens. Prefill computes 1 token
    # seeing 5 keys; decode feeds positions 5 and 6 (6 and 7 keys).
    w = run_work([5], [4], 3)
    assert (w.tokens, w.attention_keys, w.logit_rows, w.forwards) == (3, 5 + 6 + 7, 3, 3)
    assert w.kv_read_tokens == 5 + 6 + 7
    f = work_flops(w, SHAPE)
    assert f == 2 * 3 * 576 * 3 + 4 * 3 * 4 * 2 * 18 + 2 * 50 * 8 * 3
    assert work_bytes(w, SHAPE) == 3 * SHAPE.weight_bytes + (18 + 3) * SHAPE.kv_bytes_per_token


def test_add_step_matches_causal_counts():
    w = RunWork()
    w.add_step([3, 1], [7, 10], logit_rows=2)   # 3 new tokens after 4 cached; one decode
    assert w.attention_keys == (5 + 6 + 7) + 10
    assert (w.tokens, w.kv_read_tokens, w.logit_rows, w.forwards) == (4, 17, 2, 1)


def test_prefix_hits_full_blocks_only_and_last_token_computed():
    a = list(range(1, 12))                       # 11 tokens
    b = a[:9] + [50, 51, 52]                     # shares 9 tokens: 2 full blocks of 4
    c = a[:8]                                    # 8 tokens, all cached: last block recomputed
    assert prefix_hits([a, b, c], 4) == [0, 8, 4]


def test_bound_is_the_slower_of_compute_and_memory():
    w = run_work([10] * 4, [0] * 4, 8)
    fast_memory = Machine(matmul_peak_gflops=1e-3, stream_read_gbs=1e3).bound(w, SHAPE, 32)
    assert fast_memory["bound_by"] == "compute"
    assert fast_memory["bound_tokens_per_s"] == pytest.approx(32 / (work_flops(w, SHAPE) / 1e6))
    slow_memory = Machine(matmul_peak_gflops=1e3, stream_read_gbs=1e-6).bound(w, SHAPE, 32)
    assert slow_memory["bound_by"] == "memory"


def test_engine_counts_what_the_ideal_model_counts(make_ckpt):
    """No preemption, greedy: the engine's own counts equal run_work at the engine's hits
    (chunked prefill and the one-step hold-back of sharers change neither); only the forward
    passes and the context reads (a chunk reads the keys before it again) grow; with
    preemption the recomputed tokens are counted."""
    from _ranks import build_model
    from internlm2_tp.engine.engine import Engine, EngineConfig

    ckpt = make_ckpt(**SPEC)
    prompts = make_prompts(6, 5, 30, 0.5, 12, 1000, seed=3)
    new = 5
    reqs = [(i, p, SamplingParams(max_new_tokens=new, ignore_eos=True))
            for i, p in enumerate(prompts)]
    model = build_model(0, 1, 0, ckpt)
    eng = Engine(model, EngineConfig(block_size=4, max_num_batched_tokens=40), (2,))
    eng.generate(reqs)
    hits = prefix_hits(prompts, 4)
    assert eng.blocks.prefix_hit_tokens == sum(hits) > 0
    ideal = run_work([len(p) for p in prompts], hits, new)
    got = eng.work
    assert (got.tokens, got.attention_keys, got.logit_rows) == \
        (ideal.tokens, ideal.attention_keys, ideal.logit_rows)
    assert got.kv_read_tokens > ideal.kv_read_tokens     # max_num_batched_tokens=40 chunks
    assert got.forwards == eng.steps > new

    tight = Engine(model, EngineConfig(block_size=4, max_num_seqs=3, num_kv_blocks=14,
                                       enable_prefix_caching=False), (2,))
    tight.generate(reqs)
    assert tight.scheduler.num_preemptions > 0
    assert tight.work.tokens > run_work([len(p) for p in prompts], [0] * 6, new).tokens


def test_flops_per_token_is_the_old_weights_only_count(make_ckpt):
    cfg = ModelConfig.from_dir(make_ckpt(**SPEC))
    h, f = 192, 256
    per_layer = (48 + 16) * 4 * h + 48 * 4 * h + 3 * h * f
    assert flops_per_token(cfg) == 2.0 * (2 * per_layer + 1000 * h)
    assert Shape.of(cfg, torch.float32).itemsize == 4


def test_gemm_seconds_by_hand():
    """4 rows, 5-token prompts, 3 new tokens: 4 x 2 decode tokens at the 4-row rate, the 20
    prompt tokens at the prefill rate, 12 logit rows at the 4-row head rate."""
    w = run_work([5] * 4, [0] * 4, 3)
    rates = GemmRates(layers={4: 2.0, 64: 8.0}, head={4: 1.0})
    per_token = 2.0 * 3 * 576
    assert gemm_seconds(w, SHAPE, rates, 4, 3, 64) == pytest.approx(
        (per_token * 8 / 2.0 + per_token * 20 / 8.0 + 2.0 * 50 * 8 * 12 / 1.0) / 1e9)


def test_gemm_rates_measure_every_shape_asked():
    r = gemm_rates(SHAPE, torch.float32, [2, 4], 16, reps=1)
    assert set(r.layers) == {2, 4, 16} and set(r.head) == {2, 4}
    assert all(v > 0 for v in [*r.layers.values(), *r.head.values()])


def test_targets_report_met_and_missed():
    runs = {"ours_tp1": {"runs": {"64": {"tokens_per_s": 120.0, "roofline_fraction": 0.7},
                                  "256": {"tokens_per_s": 200.0, "roofline_fraction": 0.7}}},
            "vllm": {"runs": {"64": {"tokens_per_s": 100.0}, "256": {"tokens_per_s": 100.0}}},
            "ours_tp2": {"runs": {"64": {"tokens_per_s": 118.0}}}}
    got = {t["target"]: (round(t["value"], 3), t["met"]) for t in targets(runs)}
    assert got == {"ours tp1 / vLLM at 64 rows": (1.2, True),
                   "ours tp1 / vLLM at 256 rows": (2.0, True),
                   "ours tp1 share of roofline at 256 rows": (0.7, False),
                   "ours tp1 share of roofline at 64 rows": (0.7, True),
                   "tp2 / tp1 at 64 rows": (0.983, True)}


def test_passes_keep_each_sizes_fastest_repeat_and_every_figure():
    """With passes=2 an engine keeps, per size, its fastest repeat of both passes (which repeat
    it was, for the roofline of that prompt set) and every repeat's tok/s in run order."""
    from internlm2_tp.bench.suite import merge_passes

    def res(tps: dict[int, list[float]], load: float) -> dict:
        runs = {c: dict(tokens_per_s=max(v), repeat=v.index(max(v)), all_tokens_per_s=v)
                for c, v in tps.items()}
        return {"load_s": load, "runs": runs}

    first = res({16: [10.0, 12.0], 64: [50.0, 40.0]}, 0.3)
    both = merge_passes(merge_passes(None, first), res({16: [13.0, 11.0], 64: [45.0, 30.0]}, 0.9))
    assert both["runs"][16]["tokens_per_s"] == 13.0 and both["runs"][16]["repeat"] == 0
    assert both["runs"][16]["all_tokens_per_s"] == [10.0, 12.0, 13.0, 11.0]
    assert both["runs"][64]["tokens_per_s"] == 50.0 and both["runs"][64]["repeat"] == 0
    assert both["runs"][64]["all_tokens_per_s"] == [50.0, 40.0, 45.0, 30.0]
    assert both["load_s"] == 0.3
