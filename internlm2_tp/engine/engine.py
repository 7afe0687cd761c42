"""The step loop: scheduler -> model forward over the paged cache -> sampler -> stop rules.

Every rank of a tensor-parallel group runs this same loop on the same requests. The model's
collectives are the only communication inside a step; all ranks see bitwise-identical gathered
logits, and the sampler is a pure function of (logits, row seed, step), so every rank picks the
same token. The one fact a rank learns from its own device, the memory free for the KV cache, is
agreed (the group's minimum) before the cache is sized, so every scheduler has the same blocks.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch

from internlm2_tp.attention import AttentionMetadata
from internlm2_tp.engine.cache_plan import (RuntimeFacts, kv_budget_bytes, kv_bytes_per_token,
                                            max_model_len, num_kv_blocks)
from internlm2_tp.engine.config import EngineConfig
from internlm2_tp.engine.grammar_mask import Constrained
from internlm2_tp.engine.kv_cache import BlockManager, allocate_kv_caches, zero_new_blocks
from internlm2_tp.engine.params import sample_seed
from internlm2_tp.engine.sampler import BatchSamplingState, SamplingParams, sample
from internlm2_tp.engine.scheduler import Scheduler
from internlm2_tp.engine.scoring import (PromptTarget, prompt_targets, score_prompts,
                                         score_samples)
from internlm2_tp.engine.sequence import Finished, Sequence
from internlm2_tp.engine.work import RunWork
from internlm2_tp.model import InternLM2Model

log = logging.getLogger(__name__)


def plan_cache(model: InternLM2Model, cfg: EngineConfig, eos_ids: tuple[int, ...]) -> RuntimeFacts:
    """Size the KV cache: engine.num_kv_blocks, else engine.kv_cache_gb, else 90% of the
    device memory free after loading (1 GiB on CPU). Every rank proposes its figure and the
    group takes the smallest: the schedulers must agree on the blocks they share out."""
    mc = model.cfg
    per_tok = kv_bytes_per_token(mc, model.tp.size, model.dtype.itemsize)
    if cfg.num_kv_blocks:
        mine = cfg.num_kv_blocks
    else:
        budget = (cfg.kv_cache_gb * 2**30 if cfg.kv_cache_gb
                  else kv_budget_bytes(model.platform.free_memory(model.device)))
        mine = max(1, num_kv_blocks(budget, per_tok, cfg.block_size))
    blocks, every = model.tp.agree_min(mine)
    if len(set(every)) > 1 and model.tp.rank == 0:
        log.info("KV blocks per rank's own memory %s: all ranks use %d", every, blocks)
    return RuntimeFacts(blocks, cfg.block_size, blocks * cfg.block_size, per_tok,
                        model.weight_bytes, max_model_len(mc, cfg.max_model_len, blocks,
                                                          cfg.block_size), eos_ids, tuple(every))


class Engine:
    def __init__(self, model: InternLM2Model, cfg: EngineConfig, eos_ids: tuple[int, ...],
                 tokenizer: Any = None):
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        self.facts = plan_cache(model, cfg, eos_ids)
        mc = model.cfg
        dyn = mc.rope_scaling is not None and mc.rope_scaling.type == "dynamic"
        self.blocks = BlockManager(self.facts.num_blocks, cfg.block_size,
                                   cfg.enable_prefix_caching,
                                   mc.max_position_embeddings if dyn else None)
        self.scheduler = Scheduler(cfg, self.blocks)
        self.kv_caches = allocate_kv_caches(mc.num_hidden_layers, self.facts.num_blocks,
                                            cfg.block_size, model.kv_heads_local, mc.head_dim,
                                            model.dtype, model.device)
        self._zeroed = 0                # cache blocks [0, _zeroed) are initialized
        self._next_id = 0
        self.steps = 0
        self.tokens_generated = 0
        self.work = RunWork()           # what the steps computed (the benchmark's roofline)
        self.tokens_computed = 0          # tokens run through the model (prompts, chunks, decodes)
        self._constrained: Constrained | None = None   # structured output, built on first use

    def add_request(self, request_id: Any, prompt_ids: list[int], params: SamplingParams,
                    samples: tuple[int, ...] | None = None) -> None:
        """Queue a request: its samples `samples` (default: all params.n of them; a resumed row
        asks for the missing ones). The first is computed from the prompt; the others wait until
        its prompt is in the cache, then share its full blocks. Sample i's seed is
        sample_seed(params.seed, i). The one check of a prompt's length (prompts are never
        truncated): a prompt that leaves no room for one new token is a ValueError naming the
        row."""
        n, limit = len(prompt_ids), self.facts.max_model_len
        if not n:
            raise ValueError(f"row id {request_id!r}: empty prompt")
        if n >= limit:
            raise ValueError(f"row id {request_id!r}: prompt of {n} tokens does not fit the context "
                             f"(max_model_len {limit}, room for at least one new token needed); "
                             "prompts are not truncated")
        if self.model.is_reward and (params.n != 1 or params.logprobs >= 0
                                     or params.prompt_logprobs):
            raise ValueError(f"row id {request_id!r}: a reward model scores a row once: n, "
                             "logprobs and prompt_logprobs do not apply")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"row id {request_id!r}: stop strings need the engine's tokenizer")
        if params.constraint is not None and self.tokenizer is None:
            raise ValueError(f"row id {request_id!r}: {params.constraint[0]} needs the engine's "
                             "tokenizer")
        seqs = [self._sequence(request_id, prompt_ids, params, i)
                for i in (range(params.n) if samples is None else samples)]
        assert seqs, f"row id {request_id!r}: no sample asked for"
        for child in seqs[1:]:
            child.parent = seqs[0]
            child.params = replace(child.params, prompt_logprobs=False)   # the parent's, copied
        seqs[0].forks = seqs[1:]
        self.scheduler.add(seqs[0])

    def _sequence(self, request_id: Any, prompt_ids: list[int], params: SamplingParams,
                  index: int) -> Sequence:
        seq = Sequence(self._next_id, request_id, list(prompt_ids),
                       replace(params, seed=sample_seed(params.seed, index)),
                       arrival=time.perf_counter(), sample_index=index)
        if params.stop and self.tokenizer is not None:
            from internlm2_tp.tokenizer import IncrementalDetokenizer
            seq.detok = IncrementalDetokenizer(self.tokenizer)
        if params.constraint is not None:
            seq.matcher = self.constrained.matcher(request_id, params)   # ValueError: the row's
        self._next_id += 1
        return seq

    @property
    def constrained(self) -> Constrained:
        if self._constrained is None:
            head = self.model.output
            self._constrained = Constrained(self.tokenizer, self.facts.eos_ids, head.vocab,
                                            head.start, head.end, self.model.platform.to_device)
        return self._constrained

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def num_unfinished(self) -> int:
        queued = [*self.scheduler.waiting, *self.scheduler.running]
        return len(queued) + sum(len(s.forks) for s in queued)

    def _metadata(self, step) -> tuple[torch.Tensor, AttentionMetadata, list[Sequence],
                                       list[PromptTarget]]:
        # Sequences with one new token (decodes) first: attention takes a faster path for them.
        order = sorted(range(len(step.seqs)), key=lambda i: step.num_new[i] > 1)
        seqs = [step.seqs[i] for i in order]
        news = [step.num_new[i] for i in order]
        samples = [step.samples[i] for i in order]
        nd = sum(n == 1 for n in news)
        ids: list[int] = []
        pos: list[int] = []
        rope: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        sampled: list[Sequence] = []
        scored: list[int] = []            # flat indices whose logits score a prompt token
        targets: list[PromptTarget] = []
        bs = self.cfg.block_size
        offset = 0
        for seq, n, s in zip(seqs, news, samples):
            start = seq.num_computed
            ids += seq.tokens(start, start + n)
            rng = range(start, start + n)
            pos += rng
            rope += [seq.rope_length(p) for p in rng]
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in rng]
            idx, tg = prompt_targets(seq, start, n, offset)
            scored += idx
            targets += tg
            offset += n
            if s:
                last.append(offset - 1)
                sampled.append(seq)
        ctx = [s.num_computed + n for s, n in zip(seqs, news)]
        self.work.add_step(news, ctx, len(last) + len(scored))
        dev, to_device = self.model.device, self.model.platform.to_device
        meta = AttentionMetadata.build(
            positions=pos, rope_lengths=rope, slots=slots,
            block_tables=[s.block_table for s in seqs], context_lens=ctx, query_lens=news,
            logits_indices=last + scored, device=dev, to_device=to_device, num_decodes=nd)
        return to_device(torch.tensor(ids, dtype=torch.long), dev), meta, sampled, targets

    def step(self) -> list[Finished]:
        step = self.scheduler.schedule()
        if not step.seqs:
            return []
        input_ids, meta, sampled, targets = self._metadata(step)
        # The constrained rows' masks are filled on a side thread during the forward.
        masks = self._constrained.begin(sampled) if self._constrained is not None else None
        zero_new_blocks(self.kv_caches, self._zeroed, self.blocks.high_water)
        self._zeroed = max(self._zeroed, self.blocks.high_water)
        # Run even when no sequence samples (all mid-prefill chunks): the cache must be filled.
        # The model then skips the norm and the head and returns None. Logits stay per vocab
        # shard [rows, per_rank]: sampled rows first, then the prompt positions scored.
        local = self.model(input_ids, meta, self.kv_caches, gather=False)
        self.tokens_computed += step.num_tokens
        for seq, n in zip(step.seqs, step.num_new):
            seq.num_computed += n
            self.blocks.register_full_blocks(seq)
        self.steps += 1
        if local is None:
            return []
        if self.model.is_reward:
            return self._rewards(sampled, local)
        head, b = self.model.output, len(sampled)
        score_prompts(head, local[b:], targets)
        for seq in sampled:   # its prompt is in the cache: its sibling samples may start
            for child in reversed(seq.forks):
                if seq.prompt_logprobs is not None:
                    child.prompt_logprobs = list(seq.prompt_logprobs)
                self.scheduler.add(child, first=True)
            seq.forks = []
        emit = [i for i, s in enumerate(sampled) if s.params.max_new_tokens > 0]
        # Log-probabilities are the model's, before a constraint's mask: taken first (a copy).
        scored = local[emit] if any(sampled[i].params.logprobs >= 0 for i in emit) else None
        if masks is not None:
            self._constrained.mask(local, masks)
        tokens = self._pick(local[:b], sampled, emit)
        if scored is not None:   # else no [B, vocab] copy
            score_samples(head, scored, [sampled[i] for i in emit], tokens)
        return self._advance(sampled, emit, tokens)

    def _rewards(self, sampled: list[Sequence], scores: torch.Tensor) -> list[Finished]:
        """A reward model's step: scores [B] of the rows whose prompt is now complete (the
        v_head at the last token, the reward token). Each ends there; nothing is generated."""
        now = time.perf_counter()
        done = []
        for seq, score in zip(sampled, scores.tolist()):
            seq.reward = score
            self.scheduler.finish(seq, "length")
            done.append(self._finished(seq, "length", None, now))
        return done

    def _pick(self, local: torch.Tensor, sampled: list[Sequence], emit: list[int]) -> list[int]:
        """The next token of each emitting row. Greedy rows without penalties need only the
        argmax: no vocab-wide gather across ranks."""
        if not emit:
            return []
        rows = [sampled[i] for i in emit]
        local = local[emit] if len(emit) < len(sampled) else local
        if all(s.params.greedy and s.params.repetition_penalty == 1 for s in rows):
            return self.model.argmax(local).cpu().tolist()
        return self._sample(self.model.output.gather(local), rows).tolist()

    def _advance(self, sampled: list[Sequence], emit: list[int], tokens: list[int]
                 ) -> list[Finished]:
        """Append each emitted token, apply the stop rules; a row that generates nothing
        (max_new_tokens=0: scoring its prompt) ends at its prompt with "length"."""
        done: list[Finished] = []
        now = time.perf_counter()
        picked = dict(zip(emit, tokens))
        for i, seq in enumerate(sampled):
            if i not in picked:
                reason, stop_text = "length", None
            else:
                tok = picked[i]
                if not seq.output_ids:
                    seq.first_token_at = now
                seq.output_ids.append(tok)
                self.tokens_generated += 1
                reason, stop_text = self._stop(seq, tok)
            if reason:
                self.scheduler.finish(seq, reason)
                done.append(self._finished(seq, reason, stop_text, now))
        return done

    @staticmethod
    def _finished(seq: Sequence, reason: str, stop_text: str | None, now: float) -> Finished:
        first = seq.first_token_at or now
        return Finished(seq.request_id, seq.prompt_len, seq.output_ids, reason, stop_text,
                        ttft_s=first - seq.arrival, latency_s=now - seq.arrival,
                        sample_index=seq.sample_index, error=seq.error,
                        token_logprobs=seq.token_logprobs, top_logprobs=seq.top_logprobs,
                        prompt_logprobs=seq.prompt_logprobs, reward=seq.reward)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Sample where the logits are (no [B, vocab] copy to the host per step): only the [B]
        chosen ids cross back."""
        dev = logits.device
        state = BatchSamplingState.build([s.params for s in seqs], device=dev)
        step = torch.tensor([len(s.output_ids) for s in seqs], dtype=torch.long, device=dev)
        prev = None
        if state.any_penalty:
            rows = [s.prompt_ids + s.output_ids for s in seqs]
            width = max(len(r) for r in rows)
            prev = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long,
                                device=dev)
        return sample(logits, state, step, prev).cpu()

    def _stop(self, seq: Sequence, tok: int) -> tuple[str | None, str | None]:
        p = seq.params
        if seq.matcher is not None:   # eos is allowed only where the grammar may end
            ended = self.constrained.advance(seq, tok)
            if ended:
                return ended, None
        elif not p.ignore_eos and tok in self.facts.eos_ids:
            return "stop", None
        if tok in p.stop_token_ids:
            return "stop", None
        if seq.detok is not None:
            seq.detok.add(tok)
            tail = seq.detok.text[-(max(len(s) for s in p.stop) + 16):]
            hit = next((s for s in p.stop if s in tail), None)
            if hit is not None:
                return "stop", hit
        if len(seq.output_ids) >= p.max_new_tokens or seq.num_tokens >= self.facts.max_model_len:
            return "length", None
        return None, None

    def generate(self, requests: list[tuple[Any, list[int], SamplingParams]]) -> list[Finished]:
        """Run requests to completion; results in request order."""
        for rid, ids, params in requests:
            self.add_request(rid, ids, params)
        out: dict[Any, Finished] = {}
        while self.has_work():
            for f in self.step():
                out[(f.request_id, f.sample_index)] = f
        return [out[(rid, i)] for rid, _, p in requests for i in range(p.n)]
