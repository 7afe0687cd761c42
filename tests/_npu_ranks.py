"""Rank-side bodies for the emulated-NPU tests (importable by spawned children): the NPU
platform on CPU tensors with the torch_npu stand-in, or the plain CPU platform to compare."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch

from internlm2_tp.attention import AttentionMetadata, dense_metadata
from internlm2_tp.checkpoint import CheckpointReader
from internlm2_tp.config import ModelConfig
from internlm2_tp.model import InternLM2Model
from internlm2_tp.parallel.group import TPGroup, destroy_tp_group, init_tp_group
from internlm2_tp.parallel.platform import CpuPlatform, NpuPlatform, Platform
from internlm2_tp.testing.fake_torch_npu import FakeTorchNpu

BLOCK = 128   # FIA's prompt branch takes page-attention blocks of 128..512


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def platform(emulate_npu: bool, free_bytes: int = 512 << 20) -> Platform:
    return NpuPlatform(FakeTorchNpu(free_bytes=free_bytes), emulate=True) if emulate_npu \
        else CpuPlatform()


def build(rank: int, world: int, port: int, ckpt: str | Path, plat: Platform,
          dtype: torch.dtype = torch.bfloat16, tp: TPGroup | None = None) -> InternLM2Model:
    """This rank's model on `plat` (joining the group unless `tp` is given: both platforms
    here run their collectives over gloo, so one group serves both)."""
    if world > 1:
        torch.set_num_threads(1)   # two ranks on two cores: no oversubscription
    tp = tp or init_tp_group(plat, rank, world, "127.0.0.1", port)
    model = InternLM2Model(ModelConfig.from_dir(ckpt), tp, dtype, plat.local_device(rank), plat)
    model.load_weights(CheckpointReader(ckpt))
    return model


def caches(model: InternLM2Model, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, BLOCK, model.kv_heads_local, model.cfg.head_dim)
    return [(torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
            for _ in model.layers]


def prefill(model: InternLM2Model, seqs: list[list[int]]) -> torch.Tensor:
    """Logits at every position of every sequence, prefilled together: [sum(len), vocab]."""
    lens = [len(s) for s in seqs]
    meta = dense_metadata(lens, BLOCK, torch.device("cpu"), all_logits=True)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    return model(ids, meta, caches(model, sum(-(-n // BLOCK) for n in lens)))


def rank_logits(rank: int, world: int, port: int, ckpt: str, seqs: list[list[int]]
                ) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
    """(emulated NPU logits, plain CPU logits, the stand-in's op counts) on rank 0."""
    npu = platform(True)
    model = build(rank, world, port, ckpt, npu)
    plain = build(rank, world, port, ckpt, platform(False), tp=model.tp)
    out = prefill(model, seqs), prefill(plain, seqs), dict(npu.torch_npu.calls)
    destroy_tp_group(model.tp)
    return out if rank == 0 else None


def rank_generate(rank: int, world: int, port: int, ckpt: str, requests: list,
                  engine_kw: dict, emulate_npu: bool) -> tuple[list, dict]:
    from internlm2_tp.engine.engine import Engine, EngineConfig

    plat = platform(emulate_npu)
    model = build(rank, world, port, ckpt, plat)
    engine = Engine(model, EngineConfig(**engine_kw), model.cfg.eos_token_id)
    out = engine.generate(requests)
    stats = {"preemptions": engine.scheduler.num_preemptions,
             "prefix_hits": engine.blocks.prefix_hit_tokens,
             "calls": dict(plat.torch_npu.calls) if emulate_npu else {}}
    destroy_tp_group(model.tp)
    return [(f.request_id, f.output_ids, f.finish_reason) for f in out], stats


def rank_worker(rank: int, world: int, port: int, ckpt: str, requests: list, engine_kw: dict,
                free_bytes: list[int]) -> dict:
    """A whole rank (Worker) on the emulated NPU whose memory query reports free_bytes[rank]."""
    from internlm2_tp.engine.engine import EngineConfig
    from internlm2_tp.runtime.worker import Worker, WorkerSpec

    spec = WorkerSpec(model_path=ckpt, dtype="bfloat16", device="npu", tp=world, rank=rank,
                      master_addr="127.0.0.1", master_port=port, engine=EngineConfig(**engine_kw),
                      timeout_s=120, local_index=rank, threads=1)
    worker = Worker(spec, platform(True, free_bytes[rank]))
    facts = worker.setup()["facts"]
    out, stats = worker.run(requests, return_after=len(requests))
    worker.shutdown()
    return {"facts": facts, "out": out, "stats": stats}


@contextlib.contextmanager
def no_host_reads() -> Iterator[list[tuple[str, str, int]]]:
    """Record every read of a tensor's value by the host (item, tolist, bool/int/float of a
    tensor, nonzero) made from our code, not from torch or the stand-in itself."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    hits: list[tuple[str, str, int]] = []

    def spy(name: str, f):
        def read(self, *a, **k):
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if "internlm2_tp" in where and "fake_torch_npu" not in where:
                hits.append((name, where, frame.f_lineno))
            return f(self, *a, **k)
        return read

    for n, f in saved.items():
        setattr(torch.Tensor, n, spy(n, f))
    try:
        yield hits
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def mixed_step(model: InternLM2Model, ctx: list[int], new: list[int], tables: list[list[int]]
               ) -> AttentionMetadata:
    """A step over sequences with ctx[i] visible keys of which new[i] are this step's."""
    pos, slots, rope = [], [], []
    for c, n, t in zip(ctx, new, tables):
        for p in range(c - n, c):
            pos.append(p)
            slots.append(t[p // BLOCK] * BLOCK + p % BLOCK)
            rope.append(max(c - n, p + 1))
    last = [sum(new[:i + 1]) - 1 for i in range(len(new))]
    return AttentionMetadata.build(positions=pos, rope_lengths=rope, slots=slots,
                                   block_tables=tables, context_lens=ctx, query_lens=new,
                                   logits_indices=last, device=torch.device("cpu"))


# (cached keys, new tokens) per sequence, 1-token ones first: decodes, fresh prompts, both,
# prompts continuing cached keys (chunked prefill, prefix hits), and a 300-key decode.
STEPS = {"decode": [(5, 1), (300, 1), (0, 1)], "prefill": [(0, 7), (0, 130)],
         "mixed": [(40, 1), (3, 1), (0, 9), (0, 17)],
         "mixed+prefix": [(40, 1), (0, 9), (128, 5), (150, 30)]}


def attention_step(seqs: list[tuple[int, int]], dtype: torch.dtype, spare: int = 3,
                   heads: tuple[int, int] = (4, 2), device: str = "cpu"):
    """Random q/k/v [T, heads, 128] and caches for a step over (cached, new) sequences, each
    sequence's blocks scattered over the cache."""
    need = [-(-(c + n) // BLOCK) for c, n in seqs]
    perm = torch.randperm(sum(need) + spare, generator=torch.Generator().manual_seed(0)).tolist()
    tables, b0 = [], 0
    for nb in need:
        tables.append(perm[b0:b0 + nb])
        b0 += nb
    pos, slots = [], []
    for (c, n), t in zip(seqs, tables):
        pos += range(c, c + n)
        slots += [t[p // BLOCK] * BLOCK + p % BLOCK for p in range(c, c + n)]
    meta = AttentionMetadata.build(
        positions=pos, rope_lengths=[p + 1 for p in pos], slots=slots, block_tables=tables,
        context_lens=[c + n for c, n in seqs], query_lens=[n for _, n in seqs],
        logits_indices=None, device=torch.device(device))
    t = len(pos)
    h, kvh = heads
    q, k, v = rnd(t, h, 128, seed=1), rnd(t, kvh, 128, seed=2), rnd(t, kvh, 128, seed=3)
    cache = [rnd(len(perm), BLOCK, kvh, 128, seed=s).to(device, dtype) for s in (4, 5)]
    return meta, [x.to(device, dtype) for x in (q, k, v)], cache


def rank_agree(rank: int, world: int, port: int) -> tuple:
    """What two ranks agree on when their own figures differ: KV blocks, the model dtype."""
    from internlm2_tp.runtime.worker import agree_dtype

    tp = init_tp_group("cpu", rank, world, "127.0.0.1", port)
    blocks = tp.agree_min(100 + 7 * rank)
    dtype = agree_dtype(tp, torch.bfloat16 if rank == 0 else torch.float32)
    same = agree_dtype(tp, torch.bfloat16)
    destroy_tp_group(tp)
    return blocks, dtype, same
