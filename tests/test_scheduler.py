"""The scheduler's hold-back of rows that share a first KV block with a row computing it (pure
Python: a BlockManager and sequences, no model)."""
from __future__ import annotations

from internlm2_tp.engine.kv_cache import BlockManager
from internlm2_tp.engine.params import SamplingParams
from internlm2_tp.engine.config import EngineConfig
from internlm2_tp.engine.scheduler import Scheduler
from internlm2_tp.engine.sequence import Sequence

SYSTEM = list(range(100, 108))          # two blocks of 4


def seq(i: int, tail: list[int]) -> Sequence:
    return Sequence(i, i, SYSTEM + tail, SamplingParams(max_new_tokens=4, ignore_eos=True))


def scheduler() -> Scheduler:
    return Scheduler(EngineConfig(max_num_seqs=8, max_num_batched_tokens=256),
                     BlockManager(num_blocks=32, block_size=4))


def computed(sched: Scheduler, step) -> None:
    """What the engine does after running a step."""
    for s, n in zip(step.seqs, step.num_new):
        s.num_computed += n
        sched.blocks.register_full_blocks(s)


def test_a_sharer_waits_one_step_then_hits_the_cache():
    sched = scheduler()
    a, b, c = seq(0, [1, 2]), seq(1, [3, 4]), Sequence(2, 2, [7, 8, 9, 10, 11], SamplingParams())
    for s in (a, b, c):
        sched.add(s)
    first = sched.schedule()
    assert first.seqs == [a, c]                 # b shares a's uncomputed first block: held
    assert list(sched.waiting) == [b]
    computed(sched, first)
    second = sched.schedule()
    assert b in second.seqs and b.num_prefix_hits == 8


def test_a_decoding_row_whose_block_left_the_cache_holds_nobody_back():
    """A running row that computed its first block long ago is not computing it, even when that
    block's hash is no longer in the cache (it was registered under a twin that was evicted)."""
    sched = scheduler()
    a = seq(0, [1, 2])
    sched.add(a)
    computed(sched, sched.schedule())
    sched.blocks.hash_to_block.clear()          # the block's hash left the cache
    b = seq(1, [3, 4])
    sched.add(b)
    assert b in sched.schedule().seqs
