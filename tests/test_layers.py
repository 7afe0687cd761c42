"""parallel/layers.py: what each rank's layer loads (load(reader, names) from a real safetensors
file) and computes, checked against the full weights, at every tp, without a process group (the
loaders only use the rank's index; the collectives are the model's, tested in test_model.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from internlm2_tp.checkpoint import CheckpointReader
from internlm2_tp.errors import CheckpointError
from internlm2_tp.parallel.group import TPGroup
from internlm2_tp.parallel.layers import (MergedColumnParallelLinear, ParallelLMHead,
                                          QKVParallelLinear, RowParallelLinear,
                                          VocabParallelEmbedding)

HEADS, KV, D, HIDDEN, FFN, VOCAB = 16, 4, 8, 128, 64, 37   # vocab not a multiple of tp
CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> CheckpointReader:
    g = torch.Generator().manual_seed(0)
    w = {name: torch.randn(*shape, generator=g) / shape[1] ** 0.5 for name, shape in {
        "wqkv": ((HEADS + 2 * KV) * D, HIDDEN), "w1": (FFN, HIDDEN), "w3": (FFN, HIDDEN),
        "w2": (HIDDEN, FFN), "emb": (VOCAB, HIDDEN), "int": (4, 4)}.items()}
    w["int"] = w["int"].to(torch.int32)
    # The Llama layout of the same wqkv: per KV group [its q heads, its k, its v] -> q | k | v.
    grouped = w["wqkv"].view(KV, HEADS // KV + 2, D, HIDDEN)
    w["q"] = grouped[:, :-2].reshape(HEADS * D, HIDDEN).contiguous()
    w["k"] = grouped[:, -2].reshape(KV * D, HIDDEN).contiguous()
    w["v"] = grouped[:, -1].reshape(KV * D, HIDDEN).contiguous()
    w["emb_bf16"] = w["emb"].to(torch.bfloat16)
    d: Path = tmp_path_factory.mktemp("layers")
    save_file(w, str(d / "model.safetensors"))
    return CheckpointReader(d)


def full(reader: CheckpointReader, name: str) -> torch.Tensor:
    return reader.read(name)


@pytest.mark.parametrize("tp", [1, 2, 4, 8, 16])
def test_qkv_rank_holds_its_q_heads_and_their_kv_head(ckpt, tp: int) -> None:
    q, k, v = full(ckpt, "q"), full(ckpt, "k"), full(ckpt, "v")
    g = HEADS // KV
    for rank in range(tp):
        fused = QKVParallelLinear(HIDDEN, HEADS, KV, D, TPGroup(rank, tp), F32, CPU)
        fused.load(ckpt, ("wqkv",))
        split = QKVParallelLinear(HIDDEN, HEADS, KV, D, TPGroup(rank, tp), F32, CPU)
        split.load(ckpt, ("q", "k", "v"))
        assert torch.equal(fused.weight, split.weight)        # both layouts, one result
        q0, nq = rank * HEADS // tp, HEADS // tp
        kv0, nkv = q0 // g, max(1, KV // tp)                  # replicated past tp = KV
        want = torch.cat([q[q0 * D:(q0 + nq) * D], k[kv0 * D:(kv0 + nkv) * D],
                          v[kv0 * D:(kv0 + nkv) * D]])
        assert torch.equal(fused.weight, want), (tp, rank)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merged_column_and_row_parallel_sum_to_the_full_mlp(ckpt, tp: int) -> None:
    w1, w3, w2 = full(ckpt, "w1"), full(ckpt, "w3"), full(ckpt, "w2")
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    total = torch.zeros(5, HIDDEN)
    for rank in range(tp):
        up = MergedColumnParallelLinear(HIDDEN, [FFN, FFN], TPGroup(rank, tp), F32, CPU)
        up.load(ckpt, ("w1", "w3"))
        down = RowParallelLinear(FFN, HIDDEN, TPGroup(rank, tp), F32, CPU)
        down.load(ckpt, ("w2",))
        n = FFN // tp
        assert torch.equal(up.weight, torch.cat([w1[rank * n:(rank + 1) * n],
                                                 w3[rank * n:(rank + 1) * n]]))
        gate, val = up(x).split(n, dim=-1)
        total += down(F.silu(gate) * val)                     # this rank's partial sum
    want = (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)   # sums in another order


@pytest.mark.parametrize("tp", [1, 2, 3, 8])
def test_vocab_shards_partial_embeddings_and_argmax(ckpt, tp: int) -> None:
    emb = full(ckpt, "emb")
    ids = torch.tensor([0, 5, VOCAB - 1, 17, 5])
    total = torch.zeros(len(ids), HIDDEN)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(2))
    shards = []
    for rank in range(tp):
        layer = VocabParallelEmbedding(VOCAB, HIDDEN, TPGroup(rank, tp), F32, CPU)
        layer.load(ckpt, ("emb",))
        assert layer.weight.shape[0] == -(-VOCAB // tp)      # padded rows are zeros
        total += layer(ids)                                  # zeros for ids it does not own
        head = ParallelLMHead(VOCAB, HIDDEN, TPGroup(rank, tp), F32, CPU)
        head.load(ckpt, ("emb",))
        shards.append(head(x))
    assert torch.equal(total, F.embedding(ids, emb))
    logits = torch.cat(shards, dim=-1)[:, :VOCAB]
    torch.testing.assert_close(logits, x @ emb.T, rtol=1e-5, atol=1e-5)
    if tp == 1:
        assert torch.equal(head.argmax(shards[0]), torch.argmax(x @ emb.T, dim=-1))


def test_a_bf16_embedding_stays_bf16_and_is_widened_exactly(ckpt) -> None:
    layer = VocabParallelEmbedding(VOCAB, HIDDEN, TPGroup(), F32, CPU)
    layer.load(ckpt, ("emb_bf16",))
    assert layer.weight.dtype == torch.bfloat16
    ids = torch.tensor([3, 4])
    out = layer(ids)
    assert out.dtype == F32 and torch.equal(out, full(ckpt, "emb_bf16")[ids].float())


def test_loaders_refuse_wrong_shapes_and_integer_tensors(ckpt) -> None:
    down = RowParallelLinear(FFN, HIDDEN, TPGroup(), F32, CPU)
    with pytest.raises(CheckpointError, match="tensor w1 has shape"):
        down.load(ckpt, ("w1",))
    with pytest.raises(CheckpointError, match="tensor int has dtype int32"):
        RowParallelLinear(4, 4, TPGroup(), F32, CPU).load(ckpt, ("int",))
