"""Continuous batching: which sequences run in the next step, and how many tokens each.

Each step spends a token budget: running sequences first (one token each when decoding, a chunk
when still prefilling), then waiting ones in arrival order. A waiting row whose first KV block
is being computed by another row in flight (a shared system prompt arriving in a burst) waits
one step and then reuses those blocks from the prefix cache, instead of computing them again in
the same step (the prefix cache only serves blocks already computed). Long prompts are prefilled
in chunks across steps. When the cache runs out of blocks the most recently admitted running
sequence is preempted: its blocks are freed and it is recomputed later from its prompt plus what
it had generated (never a crash). Everything here is deterministic: every rank of a group runs
its own scheduler on the same inputs and makes the same decisions.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from internlm2_tp.engine.config import EngineConfig
from internlm2_tp.engine.kv_cache import BlockManager
from internlm2_tp.engine.sequence import Sequence, Status


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    num_new: list[int]          # tokens computed for each sequence this step
    samples: list[bool]         # whether the step ends that sequence's known tokens (sample next)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager):
        self.cfg, self.blocks = cfg, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, first: bool = False) -> None:
        """The engine checked that seq fits the cache (max_model_len <= its tokens). `first`:
        ahead of the queue (sibling samples whose parent's prompt was just computed)."""
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self.blocks.release(victim)
        victim.status = Status.WAITING
        victim.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> ScheduledStep:
        budget = self.cfg.max_num_batched_tokens
        step = ScheduledStep([], [], [])
        # 1. running sequences, oldest first; make room by preempting the youngest.
        for seq in sorted(self.running, key=lambda s: s.seq_id):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted below on behalf of an older sequence
            remaining = seq.num_tokens - seq.num_computed
            n = min(remaining, budget)
            while not self.blocks.reserve(seq, seq.num_computed + n):
                victim = max(self.running, key=lambda s: s.seq_id)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            step.seqs.append(seq)
            step.num_new.append(n)
            step.samples.append(seq.num_computed + n == seq.num_tokens)
            budget -= n
        # 2. admit waiting sequences while budget, slots and blocks allow; hold back the ones
        # whose first block another prefilling row is computing (they hit the cache next step).
        # Running rows count only until their first block is computed: a decoding row's block
        # may have left the cache (evicted under a twin's hash), yet nobody is computing it.
        bs = self.blocks.block_size
        in_flight = {k for k in map(self._first_key,
                                    (s for s in self.running if s.num_computed < bs))
                     if k is not None}
        held: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            key = self._first_key(seq)
            if key is not None and key in in_flight:
                held.append(self.waiting.popleft())
                continue
            if not self._admit(seq):
                break
            self.waiting.popleft()
            if key is not None:
                in_flight.add(key)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            step.seqs.append(seq)
            step.num_new.append(n)
            step.samples.append(seq.num_computed + n == seq.num_tokens)
            budget -= n
        self.waiting.extendleft(reversed(held))  # back at the front, in arrival order
        return step

    def _admit(self, seq: Sequence) -> bool:
        """Blocks for a waiting sequence: a sibling sample forks its running parent's prompt
        blocks, others allocate (with prefix-cache hits). False: not enough free blocks."""
        p = seq.parent
        if p is not None and p.status is Status.RUNNING and p.num_computed >= p.prompt_len:
            return self.blocks.fork(p, seq)
        if not self.blocks.can_allocate(seq):
            return False
        self.blocks.allocate(seq)
        return True

    def _first_key(self, seq: Sequence) -> int | None:
        """seq's first-block key while that block is not in the prefix cache yet."""
        key = self.blocks.first_block_key(seq)
        return None if key is None or self.blocks.is_cached(key) else key

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.running.remove(seq)
        self.blocks.release(seq)
