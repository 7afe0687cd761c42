"""Issue 2: the tensor-parallel model is exactly InternLM2 at every tp."""
from __future__ import annotations

import pytest
import torch

from _mp import run_ranks
from _ranks import (build_model, prefill_logits, rank_embedding, rank_lm_head_argmax, rank_load_rss,
                    rank_logits)
from internlm2_tp.parallel.layers import QKVParallelLinear
from reference import hf_llama, hf_logits

pytestmark = pytest.mark.slow   # tensor-parallel ranks as processes (gloo), HF reference

# 48 q heads over 8 KV heads, as the 20B; vocab 1000 is not a multiple of 16 (padding path).
SPEC = dict(dtype="float32", hidden_size=192, num_attention_heads=48, num_key_value_heads=8,
            intermediate_size=256, num_hidden_layers=2, vocab_size=1000)
SEQS = [[1, 5, 9, 200, 7], [1] + list(range(30, 52)), [1, 999, 3], [1, 17, 17, 17, 400, 2, 8, 650]]


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(**SPEC)


@pytest.fixture(scope="module")
def reference(ckpt):
    return hf_logits(hf_llama(ckpt), SEQS)


def test_tp1_matches_reference(ckpt, reference):
    out = prefill_logits(build_model(0, 1, 0, ckpt), SEQS)
    assert out.shape == reference.shape
    assert (out - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("tp", [2, 4, 8, 16])
def test_tp_matches_reference(ckpt, reference, tp):
    out = run_ranks(rank_logits, tp, str(ckpt), SEQS)[0]
    diff = (out - reference).abs().max().item()
    assert diff < 1e-4, f"tp={tp}: max |logit diff| {diff}"


def _naive_qkv_load(self: QKVParallelLinear, reader, name: str) -> None:
    """What an engine that assumes [Q | K | V] rows would do (the bug we guard against)."""
    full = reader.read(name)
    q_all, kv_all = self.heads * self.head_dim, self.kv_heads * self.head_dim
    q, kv = self.q_size, self.kv_size
    r = self.tp.rank
    w = self.weight.data
    w[:q].copy_(full[r * q:(r + 1) * q])
    w[q:q + kv].copy_(full[q_all + r * kv:q_all + (r + 1) * kv])
    w[q + kv:].copy_(full[q_all + kv_all + r * kv:q_all + kv_all + (r + 1) * kv])


def test_plain_qkv_slicing_would_fail(ckpt, reference, monkeypatch):
    monkeypatch.setattr(QKVParallelLinear, "_load_fused", _naive_qkv_load)
    out = prefill_logits(build_model(0, 1, 0, ckpt), SEQS)
    assert (out - reference).abs().max().item() > 1e-2


def test_bin_and_safetensors_identical(make_ckpt):
    st = make_ckpt(**SPEC, format="safetensors", seed=3)
    pt = make_ckpt(**SPEC, format="bin", seed=3)
    assert sorted(p.name for p in pt.glob("*.bin")) == ["pytorch_model-00001-of-00002.bin",
                                                        "pytorch_model-00002-of-00002.bin"]
    a = prefill_logits(build_model(0, 1, 0, st), SEQS)
    b = prefill_logits(build_model(0, 1, 0, pt), SEQS)
    assert torch.equal(a, b)


def test_load_rss_per_rank_tp4(tmp_path):
    from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint

    spec = TinySpec(dtype="float32", hidden_size=768, num_attention_heads=48,
                    num_key_value_heads=8, intermediate_size=2048, num_hidden_layers=9,
                    vocab_size=1000, num_shards=3)
    ckpt = write_tiny_checkpoint(tmp_path / "big", spec)
    results = run_ranks(rank_load_rss, 4, str(ckpt))
    weights = results[0]["weights"]
    assert weights >= 200 * 2**20
    for rank, r in enumerate(results):
        frac = r["growth"] / weights
        print(f"rank {rank}: RSS grew {r['growth'] / 2**20:.1f} MiB = {frac:.1%} of "
              f"{weights / 2**20:.0f} MiB of weights")
        assert frac < 0.40, f"rank {rank} grew {frac:.1%} of the weight bytes"


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_sharded_argmax_equals_gathered_argmax(tp):
    """Greedy decoding takes the argmax per vocab shard (no vocab-wide gather): the same ids."""
    for fast, slow, best_negative in run_ranks(rank_lm_head_argmax, tp):
        assert fast == slow
        assert fast[0] == 2                 # a tie across shards: the first id, as torch.argmax
        assert fast[1] == best_negative     # vocab padding (logit 0) never wins


def test_bf16_checkpoint_in_fp32_keeps_the_embedding_in_bf16_exactly(make_ckpt, monkeypatch):
    """An fp32 run of a bf16 checkpoint keeps the embedding table in bf16 (half the bytes) and
    widens only the looked-up rows: the logits are bit-identical to a fully widened table, and
    the tp=2 masked lookup (each row from one shard, zeros from the other) is bit-identical too."""
    from internlm2_tp.parallel.layers import VocabParallelEmbedding

    bf16 = make_ckpt(**dict(SPEC, dtype="bfloat16"))
    model = build_model(0, 1, 0, bf16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.output.packed is not None or model.output.weight.dtype == torch.float32
    compact = prefill_logits(model, SEQS)
    ids = [t for s in SEQS for t in s] + [SPEC["vocab_size"] // 2 - 1, SPEC["vocab_size"] // 2]
    sharded = run_ranks(rank_embedding, 2, str(bf16), ids)[0]   # the masked (tp > 1) lookup
    monkeypatch.setattr(VocabParallelEmbedding, "keep_checkpoint_dtype", False)
    wide = build_model(0, 1, 0, bf16)
    assert wide.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(compact, prefill_logits(wide, SEQS))
    looked_up = model.tok_embeddings(torch.tensor(ids, dtype=torch.long))
    assert sharded.dtype == looked_up.dtype == torch.float32
    assert torch.equal(sharded, looked_up)
    # the reported per-rank weight bytes are what is held: 2 bytes less per embedding entry
    table = SPEC["vocab_size"] * SPEC["hidden_size"]
    assert wide.weight_bytes - model.weight_bytes == table * 2


def test_weight_bytes_count_packed_weights(ckpt):
    """After loading on CPU the matmul weights live only in their packed copies (the dense
    parameters are emptied); weight_bytes counts those, so it still equals the bytes of the
    dense layout allocated before loading."""
    from internlm2_tp import ops
    from internlm2_tp.model import InternLM2Model

    if not ops.packs_linear_weight(torch.ones(1, 1)):
        pytest.skip("this torch build cannot pack linear weights for oneDNN (nothing to count)")
    loaded = build_model(0, 1, 0, ckpt)
    assert loaded.output.packed is not None and loaded.output.weight.numel() == 0
    fresh = InternLM2Model(loaded.cfg, loaded.tp, torch.float32, torch.device("cpu"))
    assert loaded.weight_bytes == fresh.weight_bytes > 0


def test_staging_pool_reuses_freed_buffers():
    from internlm2_tp.parallel.layers import StagingPool

    pool, cpu = StagingPool(), torch.device("cpu")
    a = pool.take(torch.Size([4, 8]), torch.float32, cpu)
    where = a.data_ptr()
    pool.give(a)
    b = pool.take(torch.Size([2, 8]), torch.float32, cpu)       # fits in the freed buffer
    assert b.data_ptr() == where and b.shape == (2, 8)
    c = pool.take(torch.Size([4, 8]), torch.float32, cpu)       # that one is in use: a new one
    assert c.data_ptr() != where
    assert pool.take(torch.Size([3]), torch.bfloat16, cpu).dtype == torch.bfloat16


def test_staging_pool_drops_smaller_buffers_when_a_bigger_one_is_needed():
    """The pool holds at most what is staged at once: a weight too big for every free buffer
    replaces them (freed), and that buffer then serves the smaller shapes."""
    from internlm2_tp.parallel.layers import StagingPool

    pool, cpu = StagingPool(), torch.device("cpu")
    small = pool.take(torch.Size([4, 8]), torch.float32, cpu)
    pool.give(small)
    big = pool.take(torch.Size([16, 8]), torch.float32, cpu)
    assert pool.free == []                                      # the small one was dropped
    pool.give(big)
    again = pool.take(torch.Size([4, 8]), torch.float32, cpu)
    assert again.data_ptr() == big.data_ptr() and len(pool.free) == 0
