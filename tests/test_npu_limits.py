"""FIA's documented limits (torch_npu-npu_fused_infer_attention_score.md) in the stand-in, and
how the NPU backend keeps inside them: decode rows past S = 262144 keys split over key ranges
and merged by the softmax LSE the op returns; a decode block_size over 512 and a BSH query of
N*D >= 65535 take the plain path with one warning. Each rule fails today's backend (before
this change it called FIA with all three)."""
from __future__ import annotations

import logging

import pytest
import torch

from _npu_ranks import BLOCK, attention_step, rnd
from internlm2_tp.attention import AttentionMetadata, TorchAttention
from internlm2_tp.attention.npu_backend import NpuAttention
from internlm2_tp.testing.fake_torch_npu import FakeTorchNpu, NpuContractError

BF16 = torch.bfloat16
FIA = "npu_fused_infer_attention_score"


def decode_step(ctx: list[int], bs: int, heads: tuple[int, int], d: int, seed: int = 0):
    """Decode rows with ctx keys each over a cache of bs-token blocks: meta, q/k/v, caches."""
    need = [-(-c // bs) for c in ctx]
    tables, b0 = [], 0
    for nb in need:
        tables.append(list(range(b0, b0 + nb)))
        b0 += nb
    meta = AttentionMetadata.build(
        positions=[c - 1 for c in ctx], rope_lengths=list(ctx),
        slots=[t[(c - 1) // bs] * bs + (c - 1) % bs for c, t in zip(ctx, tables)],
        block_tables=tables, context_lens=list(ctx), query_lens=[1] * len(ctx),
        logits_indices=None, device=torch.device("cpu"))
    h, kvh = heads
    qkv = [rnd(len(ctx), n, d, seed=seed + i).to(BF16) for i, n in enumerate((h, kvh, kvh))]
    cache = [rnd(b0, bs, kvh, d, seed=seed + 3 + i).to(BF16) for i in range(2)]
    return meta, qkv, cache


def run(backend, meta, qkv, cache, heads: int) -> torch.Tensor:
    kv = (cache[0].clone(), cache[1].clone())
    backend.prepare(meta, kv[0], heads)
    return backend.forward(*qkv, kv, meta, qkv[0].shape[-1] ** -0.5)


def plain(meta, qkv, cache, heads: int) -> torch.Tensor:
    return run(TorchAttention(), meta, [x.float() for x in qkv], [c.float() for c in cache],
               heads)


def test_split_decode_calls_merge_into_one_unsplit_call() -> None:
    """Key ranges of 256 (limit lowered): rows of 700, 5 and 300 keys take 3 + 1 + 2 calls (the
    5-key row in a call of its own), merged by LSE to what one unsplit call gives."""
    meta, qkv, cache = attention_step([(699, 1), (4, 1), (299, 1), (40, 9)], BF16)
    split_fake, one_fake = FakeTorchNpu(), FakeTorchNpu()
    got = run(NpuAttention(split_fake, decode_max_keys=256), meta, qkv, cache, 4)
    want = run(NpuAttention(one_fake), meta, qkv, cache, 4)
    assert split_fake.calls[FIA] == 3 + 1 + 2 + 1 and one_fake.calls[FIA] == 2   # + prefill
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1.6e-2)  # 2 bf16 ulps
    torch.testing.assert_close(got.float(), plain(meta, qkv, cache, 4), rtol=4e-2, atol=4e-2)


def test_decode_row_past_262144_keys_is_split() -> None:
    """A 262,244-key decode row beside a short one: the stand-in refuses S > 262144 in one
    call; the backend reads the long row in two ranges."""
    meta, qkv, cache = decode_step([262144 + 100, 50], BLOCK, (2, 1), 16)
    fake = FakeTorchNpu()
    got = run(NpuAttention(fake), meta, qkv, cache, 2)
    assert fake.calls[FIA] == 1 + 2
    torch.testing.assert_close(got.float(), plain(meta, qkv, cache, 2), rtol=4e-2, atol=4e-2)


@pytest.mark.parametrize("case", ["block_size_1024", "bsh_n_times_d"])
def test_shapes_past_the_decode_limits_take_the_plain_path_with_one_warning(
        case: str, caplog) -> None:
    """block_size 1024 (decode takes <= 512); 256 heads of dim 256 (a BSH query's N*D must be
    < 65535): no FIA call, the plain path's result, one warning over two steps."""
    bs, heads, d = (1024, (4, 2), 16) if case == "block_size_1024" else (16, (256, 8), 256)
    meta, qkv, cache = decode_step([1500 if bs == 1024 else 40, 7], bs, heads, d)
    fake = FakeTorchNpu()
    backend = NpuAttention(fake)
    with caplog.at_level(logging.WARNING, logger="internlm2_tp.attention.npu_backend"):
        outs = [run(backend, meta, qkv, cache, heads[0]) for _ in range(2)]
    assert not fake.calls
    assert len(caplog.records) == 1 and "plain path" in caplog.text, caplog.text
    for got in outs:
        torch.testing.assert_close(got.float(), plain(meta, qkv, cache, heads[0]),
                                   rtol=4e-2, atol=4e-2)


@pytest.mark.parametrize("case", ["keys", "block_size", "bsh_h"])
def test_stand_in_refuses_each_documented_decode_limit(case: str) -> None:
    ctx, bs, heads, d = {"keys": ([262145], 128, (2, 1), 16),
                         "block_size": ([100], 1024, (4, 2), 16),
                         "bsh_h": ([20], 16, (256, 8), 256)}[case]
    meta, (q, _, _), cache = decode_step(ctx, bs, heads, d)
    nb, _, kvh, _ = cache[0].shape
    with pytest.raises(NpuContractError, match="docs/context/torch_npu-npu_fused_infer"):
        FakeTorchNpu().npu_fused_infer_attention_score(
            q.reshape(1, 1, -1), cache[0].view(nb, bs, -1), cache[1].view(nb, bs, -1),
            actual_seq_lengths_kv=ctx, block_table=meta.block_tables.to(torch.int32),
            num_heads=heads[0], num_key_value_heads=kvh, scale=1.0, input_layout="BSH",
            block_size=bs)
