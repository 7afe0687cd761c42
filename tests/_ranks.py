"""Rank-side bodies for multi-process tests (importable by spawned children)."""
from __future__ import annotations

from pathlib import Path

import torch

from internlm2_tp import ops
from internlm2_tp.attention import dense_metadata
from internlm2_tp.checkpoint import CheckpointReader
from internlm2_tp.config import ModelConfig
from internlm2_tp.model import InternLM2Model
from internlm2_tp.parallel.group import destroy_tp_group, init_tp_group


def build_model(rank: int, world: int, port: int, ckpt: str | Path,
                dtype: torch.dtype = torch.float32, tp: object = None,
                lora: str = "") -> InternLM2Model:
    """`tp`: an existing group (several models on one group); `lora`: an adapter to merge."""
    cfg = ModelConfig.from_dir(ckpt)
    tp = tp or init_tp_group("cpu", rank, world, "127.0.0.1", port)
    model = InternLM2Model(cfg, tp, dtype, torch.device("cpu"))
    reader = CheckpointReader(ckpt)
    if lora:
        from internlm2_tp.lora import LoraAdapter, MergingReader
        reader = MergingReader(reader, LoraAdapter(lora, cfg.layout, reader))
    model.load_weights(reader)
    return model


def rank_lora_tokens(rank: int, world: int, port: int, runs: list[tuple[str, str]],
                     requests: list) -> list | None:
    """Greedy tokens of each (checkpoint, adapter or "") in `runs` on one group, in turn."""
    from internlm2_tp.engine.engine import Engine, EngineConfig

    tp, out = None, []
    for ckpt, lora in runs:
        model = build_model(rank, world, port, ckpt, tp=tp, lora=lora)
        tp = model.tp
        engine = Engine(model, EngineConfig(block_size=16, num_kv_blocks=64),
                        model.cfg.eos_token_id)
        out.append([f.output_ids for f in engine.generate(requests)])
    destroy_tp_group(tp)
    return out if rank == 0 else None


def fresh_caches(model: InternLM2Model, num_blocks: int, block_size: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, block_size, model.kv_heads_local, model.cfg.head_dim)
    return [(torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
            for _ in model.layers]


def prefill_logits(model: InternLM2Model, seqs: list[list[int]], block_size: int = 4
                   ) -> torch.Tensor:
    """Logits at every position of every sequence, prefilled together: [sum(len), vocab]."""
    lens = [len(s) for s in seqs]
    meta = dense_metadata(lens, block_size, torch.device("cpu"), all_logits=True)
    caches = fresh_caches(model, sum(-(-n // block_size) for n in lens), block_size)
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    return model(ids, meta, caches)


def rank_logits(rank: int, world: int, port: int, ckpt: str, seqs: list[list[int]]
                ) -> torch.Tensor | None:
    model = build_model(rank, world, port, ckpt)
    out = prefill_logits(model, seqs)
    destroy_tp_group(model.tp)
    return out if rank == 0 else None


@torch.inference_mode()
def rank_embedding(rank: int, world: int, port: int, ckpt: str, ids: list[int]
                   ) -> torch.Tensor | None:
    """The model's first step alone: this rank's masked vocab-shard lookup, all-reduced."""
    model = build_model(rank, world, port, ckpt)
    out = model.tp.all_reduce(model.tok_embeddings(torch.tensor(ids, dtype=torch.long)))
    destroy_tp_group(model.tp)
    return out if rank == 0 else None


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rank_load_rss(rank: int, world: int, port: int, ckpt: str) -> dict[str, int]:
    """RSS growth while loading: the kernel's peak (VmHWM, reset just before load_weights via
    /proc/self/clear_refs) above the RSS just before loading starts.

    One small weight is packed first: the first oneDNN reorder pages in ~10 MiB of
    libtorch_cpu.so code (file-backed, the same for any model size), which is not weight
    memory; every process that runs a matmul has those pages anyway."""
    cfg = ModelConfig.from_dir(ckpt)
    tp = init_tp_group("cpu", rank, world, "127.0.0.1", port)
    model = InternLM2Model(cfg, tp, torch.float32, torch.device("cpu"))
    reader = CheckpointReader(ckpt)
    ops.pack_linear_weight(torch.ones(64, 64))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark to the current RSS
    before = _status_kib("VmRSS")
    model.load_weights(reader)
    peak = _status_kib("VmHWM")
    destroy_tp_group(tp)
    return {"growth": (peak - before) * 1024, "weights": reader.total_bytes()}


def rank_generate(rank: int, world: int, port: int, ckpt: str, requests: list, engine_kw: dict,
                  dtype: torch.dtype = torch.float32, tokenizer: bool = False) -> list | None:
    """Run an Engine over `requests` [(id, prompt_ids, SamplingParams)] on this rank
    (`tokenizer`: with the checkpoint's, for stop strings and structured output)."""
    from internlm2_tp.engine.engine import Engine, EngineConfig
    from internlm2_tp.tokenizer import Tokenizer

    model = build_model(rank, world, port, ckpt, dtype)
    tok = Tokenizer.from_dir(ckpt, chat_template="builtin") if tokenizer else None
    engine = Engine(model, EngineConfig(**engine_kw), model.cfg.eos_token_id, tok)
    out = engine.generate(requests)
    stats = {"preemptions": engine.scheduler.num_preemptions,
             "prefix_hits": engine.blocks.prefix_hit_tokens, "steps": engine.steps}
    destroy_tp_group(model.tp)
    return [(f.request_id, f.output_ids, f.finish_reason) for f in out], stats


def rank_lm_head_argmax(rank: int, world: int, port: int) -> tuple[list[int], list[int], int]:
    """ParallelLMHead.argmax against the argmax of the gathered logits, on a vocab that does not
    divide by tp (padding), with ties across shards and rows whose logits are all negative."""
    from internlm2_tp.parallel.layers import ParallelLMHead

    tp = init_tp_group("cpu", rank, world, "127.0.0.1", port)
    vocab, hidden = 11, 4
    g = torch.Generator().manual_seed(0)
    full = torch.randn(vocab, hidden, generator=g)
    full[:, 0] = -full[:, 0].abs() - 1    # column 0 negative: x = e0 makes every logit < 0
    full[2, 1] = full[7, 1] = 10.0         # x = e1: ids 2 and 7 (other shards) tie at the top
    head = ParallelLMHead(vocab, hidden, tp, torch.float32, torch.device("cpu"))
    n = max(0, head.end - head.start)
    head.weight.data.zero_()
    head.weight.data[:n] = full[head.start:head.end]
    x = torch.randn(6, hidden, generator=g)
    x[0], x[1] = torch.eye(hidden)[1], torch.eye(hidden)[0]
    local = head(x)
    fast = head.argmax(local).tolist()
    slow = head.gather(local).argmax(dim=-1).tolist()
    destroy_tp_group(tp)
    return fast, slow, int(full[:, 0].argmax())


def rank_finished(rank: int, world: int, port: int, ckpt: str, runs: list) -> list | None:
    """For each run (requests [(id, prompt_ids, SamplingParams)], samples {id: sample indices}
    or None, EngineConfig kwargs): a fresh Engine on one loaded model runs the requests (only
    the given samples of a request where listed). Rank 0 returns [(every Finished, stats)]."""
    from internlm2_tp.engine.engine import Engine, EngineConfig

    model = build_model(rank, world, port, ckpt)
    out = []
    for requests, samples, engine_kw in runs:
        engine = Engine(model, EngineConfig(**engine_kw), model.cfg.eos_token_id)
        for rid, ids, params in requests:
            engine.add_request(rid, ids, params, (samples or {}).get(rid))
        done = []
        while engine.has_work():
            done += engine.step()
        out.append((done, {"prefix_hits": engine.blocks.prefix_hit_tokens,
                           "tokens_computed": engine.tokens_computed}))
    destroy_tp_group(model.tp)
    return out if rank == 0 else None
