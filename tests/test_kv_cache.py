"""engine/kv_cache.py's block manager (pure Python, no model): allocation, prefix-cache hits,
eviction of freed blocks, reference counts, and the dynamic-NTK salt."""
from __future__ import annotations

import torch

from internlm2_tp.engine.kv_cache import BlockManager, allocate_kv_caches
from internlm2_tp.engine.params import SamplingParams
from internlm2_tp.engine.sequence import Sequence


def seq(i: int, tokens) -> Sequence:
    return Sequence(i, i, list(tokens), SamplingParams())


def computed(bm: BlockManager, s: Sequence) -> None:
    """What the engine does once a step computed all of s's tokens."""
    s.num_computed = s.num_tokens
    bm.register_full_blocks(s)


def test_caches_are_per_layer_keys_and_values_of_the_ranks_heads():
    caches = allocate_kv_caches(3, 5, 4, 2, 8, torch.float32, torch.device("cpu"))
    assert len(caches) == 3
    assert all(k.shape == v.shape == (5, 4, 2, 8) for k, v in caches)


def test_allocation_reserve_and_release():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(0, range(10))                       # 10 tokens: 3 blocks
    assert bm.can_allocate(s) and bm.blocks_for(10) == 3
    bm.allocate(s)
    assert s.block_table == [0, 1, 2] and bm.num_free == 5 and s.num_computed == 0
    assert bm.reserve(s, 13) and s.block_table == [0, 1, 2, 3]      # room for token 13
    assert not bm.reserve(s, 40) and len(s.block_table) == 4         # too few free: none taken
    bm.release(s)
    assert bm.num_free == 8 and s.block_table == [] and s.num_computed == 0
    assert all(r == 0 for r in bm.ref)
    # freed blocks go to the back, the sequence's tail first: untouched blocks are used first
    t = seq(1, range(500, 520))
    bm.allocate(t)
    assert t.block_table == [4, 5, 6, 7, 3]
    assert not bm.can_allocate(seq(2, range(16)))                    # 4 blocks, 3 free


def test_prefix_hits_share_blocks_and_count_references():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, range(100, 110))                 # two full blocks and a partial one
    bm.allocate(a)
    computed(bm, a)
    b = seq(1, [*range(100, 108), 7, 7, 7])     # the same first two blocks
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    assert b.num_computed == b.num_prefix_hits == 8 and bm.prefix_hit_tokens == 8
    assert [bm.ref[x] for x in a.block_table] == [2, 2, 1]
    bm.release(a)
    assert [bm.ref[x] for x in b.block_table[:2]] == [1, 1]
    assert not any(x in bm.free for x in b.block_table)              # still held by b
    bm.release(b)
    assert all(r == 0 for r in bm.ref) and bm.num_free == 8


def test_the_last_token_is_always_recomputed():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, range(8))
    bm.allocate(a)
    computed(bm, a)
    twin = seq(1, range(8))                     # both blocks cached, but its logits are needed
    bm.allocate(twin)
    assert twin.num_prefix_hits == 4 and twin.block_table[0] == a.block_table[0]
    assert twin.block_table[1] != a.block_table[1]


def test_freed_blocks_stay_cached_until_evicted():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = seq(0, range(9))
    bm.allocate(a)
    computed(bm, a)
    key = bm.first_block_key(a)
    bm.release(a)
    assert key is not None and bm.is_cached(key)                     # free, yet still cached
    b = seq(1, [*range(8), 50])
    bm.allocate(b)
    assert b.num_prefix_hits == 8
    bm.release(b)
    c = seq(2, range(200, 211))                 # needs every block: the cached ones are evicted
    bm.allocate(c)
    assert not bm.is_cached(key)
    bm.release(c)
    d = seq(3, [*range(8), 50])
    bm.allocate(d)
    assert d.num_prefix_hits == 0 and d.num_computed == 0


def test_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq(0, range(9))
    bm.allocate(a)
    computed(bm, a)
    b = seq(1, range(9))
    bm.allocate(b)
    assert b.num_prefix_hits == 0 and bm.first_block_key(b) is None


def test_dynamic_ntk_blocks_are_shared_only_by_prompts_of_the_same_length():
    """Past max_position_embeddings a key's rotation depends on the prompt length."""
    bm = BlockManager(num_blocks=16, block_size=4, dynamic_max_pos=8)
    a = seq(0, range(12))
    bm.allocate(a)
    computed(bm, a)
    longer = seq(1, [*range(12), 1, 2])         # same first 12 tokens, a longer prompt
    bm.allocate(longer)
    assert longer.num_prefix_hits == 0
    same = seq(2, [*range(11), 99])             # the same length: its first two blocks hit
    bm.allocate(same)
    assert same.num_prefix_hits == 8


def test_a_sibling_sample_forks_the_computed_prompt_blocks():
    """n samples of one prompt: a sibling shares the parent's full prompt blocks by reference
    count (with or without the prefix cache) and recomputes only the last partial block."""
    for caching in (True, False):
        bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=caching)
        parent, child = seq(0, range(10)), seq(1, range(10))    # 2 full blocks + 2 tokens
        bm.allocate(parent)
        computed(bm, parent)
        parent.output_ids.append(99)                 # the parent decodes on in its own block
        assert bm.fork(parent, child)
        assert child.block_table[:2] == parent.block_table[:2]
        assert child.block_table[2] != parent.block_table[2]
        assert child.num_computed == child.num_prefix_hits == 8
        assert [bm.ref[b] for b in parent.block_table] == [2, 2, 1] and bm.num_free == 4
        assert len(child.block_hashes) == child.num_hashed_blocks == (2 if caching else 0)
        bm.release(parent)
        assert [bm.ref[b] for b in child.block_table] == [1, 1, 1]
        bm.release(child)
        assert bm.num_free == 8
    # too few free blocks: nothing taken
    bm = BlockManager(num_blocks=3, block_size=4)
    parent, child = seq(0, range(10)), seq(1, range(10))
    bm.allocate(parent)
    computed(bm, parent)
    assert not bm.fork(parent, child) and child.block_table == [] and bm.ref == [1, 1, 1]


def test_a_row_that_scores_its_prompt_takes_no_prefix_hit():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(0, range(10))
    bm.allocate(a)
    computed(bm, a)
    b = Sequence(1, 1, list(range(10)), SamplingParams(prompt_logprobs=True))
    assert bm.first_block_key(b) is None
    bm.allocate(b)
    assert b.num_computed == 0 and not set(b.block_table) & set(a.block_table)
