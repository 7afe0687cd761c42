"""The Ascend path executed on CPU: the NPU platform's op set and attention backend against a
torch_npu stand-in that enforces each op's documented contract (internlm2_tp/testing/
fake_torch_npu.py). Each op and each kind of attention step against the plain path, a full
forward at tp 1 and 2 (gloo) in bf16, the engine end to end with prefix cache and preemption,
and two ranks whose memory queries disagree. Nothing here needs a device; nothing skips."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from _mp import run_ranks
from _npu_ranks import (BLOCK, STEPS, attention_step, build, mixed_step, no_host_reads,
                        platform, prefill, rank_generate, rank_logits, rank_worker, rnd)
from conftest import ROOT
from internlm2_tp.attention import AttentionMetadata, TorchAttention
from internlm2_tp.attention.npu_backend import NpuAttention
from internlm2_tp.engine.params import SamplingParams
from internlm2_tp.ops import TorchOps
from internlm2_tp.ops.npu import NpuOps
from internlm2_tp.runtime.data.rows import Request
from internlm2_tp.runtime.worker import digest
from internlm2_tp.testing.fake_torch_npu import FakeTorchNpu, NpuContractError

BF16 = torch.bfloat16
TOL = dict(rtol=4e-2, atol=4e-2)
# head_dim 128 as every InternLM2 (the fused kernels' documented shapes), 2 q heads per KV head
SPEC = dict(dtype="bfloat16", hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=1024, num_hidden_layers=2, vocab_size=1000)


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return str(make_ckpt(**SPEC))


@pytest.fixture
def one_thread():
    """These models are tiny: a second torch thread only contends with the other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- each op against the plain path ----------------------------------------------------------------
def test_rms_norm_and_swiglu_match_plain_path() -> None:
    npu, ref = NpuOps(FakeTorchNpu()), TorchOps()
    x, w = rnd(33, 512).to(BF16), (1 + 0.1 * rnd(512, seed=1)).to(BF16)
    torch.testing.assert_close(npu.rms_norm(x, w, 1e-5).float(), ref.rms_norm(x, w, 1e-5).float(),
                               **TOL)
    gu = rnd(33, 2048, seed=2).to(BF16)
    torch.testing.assert_close(npu.silu_and_mul(gu).float(), ref.silu_and_mul(gu).float(), **TOL)
    assert npu.npu.calls == {"npu_rms_norm": 1, "npu_swiglu": 1}


def test_rotary_matches_plain_path_in_the_4d_form() -> None:
    """npu_rotary_mul takes 4-D input on op-plugin 7.1.0/7.2.0 (the stand-in enforces it): the
    op set must pass [1, T, H, d] with cos/sin [1, T, 1, d]. 3-D [T, H, d] fails here."""
    npu, ref = NpuOps(FakeTorchNpu()), TorchOps()
    q, k = rnd(33, 4, 128).to(BF16), rnd(33, 2, 128, seed=1).to(BF16)
    ang = torch.rand(33, 64, generator=torch.Generator().manual_seed(2)) * 6
    cos, sin = [f(torch.cat([ang, ang], -1)).to(BF16) for f in (torch.cos, torch.sin)]
    for got, want in zip(npu.rotary(q, k, cos, sin), ref.rotary(q, k, cos, sin)):
        assert got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), **TOL)
    assert npu.npu.calls["npu_rotary_mul"] == 2


@pytest.mark.parametrize("case", ["rotary_3d", "rms_norm_gamma_dtype", "swiglu_strided",
                                  "swiglu_empty"])
def test_stand_in_refuses_what_the_docs_refuse(case: str) -> None:
    npu = FakeTorchNpu()
    x = rnd(8, 4, 128).to(BF16)
    c = torch.ones(8, 1, 128, dtype=BF16)
    calls = {"rotary_3d": lambda: npu.npu_rotary_mul(x, c, c),
             "rms_norm_gamma_dtype": lambda: npu.npu_rms_norm(x, torch.ones(128)),
             "swiglu_strided": lambda: npu.npu_swiglu(rnd(8, 256).to(BF16).t()),
             "swiglu_empty": lambda: npu.npu_swiglu(torch.empty(0, 256, dtype=BF16))}
    with pytest.raises(NpuContractError, match="docs/context/torch_npu-npu_"):
        calls[case]()


# -- attention steps -------------------------------------------------------------------------------
def run_backend(backend, meta: AttentionMetadata, qkv: list[torch.Tensor],
                cache: list[torch.Tensor]) -> torch.Tensor:
    kv = (cache[0].clone(), cache[1].clone())
    backend.prepare(meta, kv[0], 4)
    return backend.forward(*qkv, kv, meta, 128 ** -0.5)


@pytest.mark.parametrize("step", list(STEPS))
def test_attention_steps_match_plain_path(step: str) -> None:
    meta, qkv, cache = attention_step(STEPS[step], BF16)
    fake = FakeTorchNpu()
    got = run_backend(NpuAttention(fake), meta, qkv, cache)
    want = run_backend(TorchAttention(), meta, [x.float() for x in qkv],
                       [c.float() for c in cache])
    torch.testing.assert_close(got.float(), want, **TOL)
    new = [n for _, n in STEPS[step]]
    phases = (1 in new) + (max(new) > 1)              # one call per phase: decode, prefill
    assert fake.calls["npu_fused_infer_attention_score"] == phases, fake.calls


def test_attention_splits_calls_when_shared_blocks_outnumber_the_cache() -> None:
    """FIA needs blocknum >= the sum of the call's rows' blocks; rows sharing prefix blocks can
    need more than the cache holds, so the backend splits them into several calls."""
    meta, qkv, cache = attention_step([(300, 1)] * 2, BF16, spare=0)
    tables = [meta.block_tables[0].tolist()] * 6                 # six rows share 3 blocks
    meta = AttentionMetadata.build(positions=[300] * 6, rope_lengths=[301] * 6,
                                   slots=[tables[0][2] * BLOCK + 44] * 6, block_tables=tables,
                                   context_lens=[301] * 6, query_lens=[1] * 6,
                                   logits_indices=None, device=torch.device("cpu"))
    qkv = [rnd(6, 4, 128, seed=7).to(BF16)] + [x[:1].expand(6, 2, 128).contiguous()
                                               for x in qkv[1:]]
    fake = FakeTorchNpu()
    got = run_backend(NpuAttention(fake), meta, qkv, cache)
    want = run_backend(TorchAttention(), meta, [x.float() for x in qkv],
                       [c.float() for c in cache])
    torch.testing.assert_close(got.float(), want, **TOL)
    # a 6-block cache, 3 blocks per row: two rows per call
    assert fake.calls["npu_fused_infer_attention_score"] == 3


def test_attention_falls_back_where_the_kernel_is_not_documented() -> None:
    """fp32 (FIA takes fp16/bf16 only): the plain path runs, the kernel is never called."""
    meta, qkv, cache = attention_step(STEPS["mixed+prefix"], torch.float32)
    fake = FakeTorchNpu()
    got = run_backend(NpuAttention(fake), meta, qkv, cache)
    assert not fake.calls
    torch.testing.assert_close(got, run_backend(TorchAttention(), meta, qkv, cache))


# -- the model -------------------------------------------------------------------------------------
SEQS = [[1, 5, 9, 200, 7] * 30, [1] + list(range(30, 170)), [1, 999, 3] * 10]


@pytest.mark.slow   # ranks as processes (gloo)
@pytest.mark.parametrize("tp", [1, 2])
def test_forward_matches_plain_path(ckpt, tp: int) -> None:
    npu, plain, calls = run_ranks(rank_logits, tp, ckpt, SEQS)[0]
    assert {"npu_rms_norm", "npu_rotary_mul", "npu_swiglu",
            "npu_fused_infer_attention_score"} <= set(calls)
    err = ((npu - plain).abs().max() / plain.abs().max()).item()
    agree = (npu.argmax(-1) == plain.argmax(-1)).float().mean().item()
    assert err < 5e-2 and agree > 0.9, (err, agree)


def test_forward_reads_nothing_back_from_the_device(ckpt, one_thread) -> None:
    """A mixed step (decodes, a prefix continuation, a fresh prompt) on both platforms: no
    item()/tolist()/bool()/int() of a device tensor in the model, rotary or attention."""
    for emulate in (True, False):
        model = build(0, 1, 0, ckpt, platform(emulate))
        meta = mixed_step(model, [140, 20, 200, 50], [1, 1, 60, 50], [[0, 1], [2], [3, 4], [5]])
        kv = [(rnd(6, BLOCK, 2, 128, seed=i).to(BF16), rnd(6, BLOCK, 2, 128, seed=9).to(BF16))
              for i in range(2)]
        with no_host_reads() as reads:
            logits = model(torch.randint(0, 1000, (112,)), meta, kv)
        assert logits.shape == (4, 1000) and reads == [], reads


def test_a_step_that_samples_nothing_skips_the_norm_and_head(ckpt, one_thread) -> None:
    """Only prefill chunks (no row samples): the layers run (the cache must be filled), the
    final norm and the output head do not, and the model returns None."""
    plat = platform(True)
    model = build(0, 1, 0, ckpt, plat)
    meta = mixed_step(model, [100, 50], [60, 50], [[0], [1]])
    meta.logits_indices = meta.logits_indices[:0]
    kv = [(torch.zeros(2, BLOCK, 2, 128, dtype=BF16), torch.zeros(2, BLOCK, 2, 128, dtype=BF16))
          for _ in range(2)]
    assert model(torch.randint(0, 1000, (110,)), meta, kv) is None
    assert plat.torch_npu.calls["npu_rms_norm"] == 2 * 2            # two per layer, no final
    assert kv[0][0].abs().sum() > 0


# -- the engine ------------------------------------------------------------------------------------
def engine_requests() -> list:
    """Two rows share a 128-token system prompt (a prefix-cache hit); four rows of 100-125
    tokens cross into their second block while decoding (the 4-block cache preempts)."""
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, 1000, (n,), generator=g).tolist()  # noqa: E731
    system = [1] + ids(127)
    prompts = [system + ids(12), system + ids(20)] + [[1] + ids(n) for n in (99, 110, 118, 124)]
    return [(i, p, SamplingParams(max_new_tokens=24, ignore_eos=True))
            for i, p in enumerate(prompts)]


ENGINE = dict(block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=256, num_kv_blocks=4)


def test_engine_greedy_matches_plain_path(ckpt, one_thread) -> None:
    npu, stats = rank_generate(0, 1, 0, ckpt, engine_requests(), ENGINE, True)
    plain, plain_stats = rank_generate(0, 1, 0, ckpt, engine_requests(), ENGINE, False)
    assert stats["preemptions"] > 0 and stats["prefix_hits"] >= 128, stats
    assert stats["calls"]["npu_fused_infer_attention_score"] > 0
    assert (stats["preemptions"], stats["prefix_hits"]) == (plain_stats["preemptions"],
                                                           plain_stats["prefix_hits"])
    model = build(0, 1, 0, ckpt, platform(False))
    prompts = {rid: p for rid, p, _ in engine_requests()}
    for (rid, got, _), (_, want, _) in zip(npu, plain):
        if got == want:
            continue
        i = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
        logits = prefill(model, [prompts[rid] + want[:i]])[-1].float()
        gap = (logits[want[i]] - logits[got[i]]).abs().item()
        assert gap < 0.05 * logits.std().item(), f"row {rid} token {i}: not a near-tie ({gap})"


@pytest.mark.slow   # ranks as processes (gloo)
def test_ranks_agree_on_kv_blocks_when_their_memory_differs(ckpt) -> None:
    """Two gloo ranks whose NPU memory queries report 0.6 and 1.1 MiB free: alone they would
    size 4 and 7 blocks of 128 KiB (90%); both allocate 4, and a job that overfills the cache
    (preemptions) finishes with the same digest on both."""
    free = [614 << 10, 1126 << 10]
    requests = [Request(rid, p, params) for rid, p, params in engine_requests()]
    r0, r1 = run_ranks(rank_worker, 2, ckpt, requests, dict(ENGINE, num_kv_blocks=0), free)
    assert r0["facts"].rank_blocks == r1["facts"].rank_blocks == (4, 7)
    assert r0["facts"].num_blocks == r1["facts"].num_blocks == 4
    assert r0["stats"]["preemptions"] > 0 and r0["stats"] == r1["stats"] | {
        "busy_s": r0["stats"]["busy_s"]}
    assert len(r0["out"]) == 6 and digest(r0["out"]) == r1["out"]


@pytest.mark.slow   # the script as a process
def test_device_check_script_runs_on_the_emulated_npu() -> None:
    """scripts/device_check.py --emulate-npu: every row of its table ok, exit code 0."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"),
                        "--emulate-npu", "--tp", "2"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    table = r.stdout[r.stdout.index("device check: npu emulated"):]
    assert "FAIL" not in table and table.count("  ok  ") == 11, table
