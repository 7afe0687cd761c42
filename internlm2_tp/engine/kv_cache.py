"""Paged KV cache: the device tensors, and the block manager with prefix caching.

Each rank holds only its own KV heads: [num_blocks, block_size, kv_heads_local, head_dim] per
layer for keys and for values. The block manager is pure Python and deterministic, so every rank
of a group makes the same decisions from the same inputs without talking.

Prefix caching: a full block is known by a chain hash of (previous block's hash, its tokens,
a rotation salt). A freed block keeps its contents and hash until it is handed out again (LRU),
so rows sharing a long system prompt share its blocks. The salt exists because with dynamic NTK
a key's rotation depends on the prompt length once lengths pass max_position_embeddings: such
blocks are only shared between prompts of the same length.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from internlm2_tp.engine.sequence import Sequence


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                       head_dim: int, dtype: torch.dtype, device: torch.device
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Uninitialized: blocks are zeroed when first handed out (zero_new_blocks), so a cache
    sized for the whole device holds memory only for the blocks a run has used (on CPU the
    pages stay unmapped until then)."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return [(torch.empty(shape, dtype=dtype, device=device),
             torch.empty(shape, dtype=dtype, device=device)) for _ in range(num_layers)]


def zero_new_blocks(caches: list[tuple[torch.Tensor, torch.Tensor]], start: int, end: int
                    ) -> None:
    """Zero blocks [start, end) of every layer before their first use: attention reads whole
    blocks and masks the slots past a row's context, and a masked slot must not hold NaN."""
    if end > start:
        for k, v in caches:
            k[start:end].zero_()
            v[start:end].zero_()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 dynamic_max_pos: int | None = None):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = enable_prefix_caching
        self.dynamic_max_pos = dynamic_max_pos
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.block_hash: dict[int, int] = {}
        self.prefix_hit_tokens = 0    # counters, for reports and tests
        self.high_water = 0           # blocks [0, high_water) have been handed out
        self.prefix_query_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _salt(self, seq: Sequence, block_index: int) -> int:
        end = (block_index + 1) * self.block_size
        if self.dynamic_max_pos is None or max(seq.prompt_len, end) <= self.dynamic_max_pos:
            return 0
        return seq.prompt_len

    def _hash(self, seq: Sequence, i: int) -> int:
        parent = seq.block_hashes[i - 1] if i else 0
        bs = self.block_size
        return hash((parent, tuple(seq.tokens(i * bs, (i + 1) * bs)), self._salt(seq, i)))

    def _take(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def _fresh(self) -> int:
        block, _ = self.free.popitem(last=False)  # least recently freed
        self.high_water = max(self.high_water, block + 1)
        h = self.block_hash.pop(block, None)
        if h is not None and self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]
        self.ref[block] = 1
        return block

    def first_block_key(self, seq: Sequence) -> int | None:
        """The prefix-cache key of seq's first block when allocate() could reuse it, else None
        (caching off, or no full block before the last token)."""
        if (not self.prefix_caching or seq.params.prompt_logprobs
                or (seq.num_tokens - 1) // self.block_size < 1):
            return None
        return self._hash(seq, 0)

    def is_cached(self, key: int) -> bool:
        return key in self.hash_to_block

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        return self.blocks_for(seq.num_tokens) + reserve <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of seq's current tokens, reusing cached full blocks of its prefix.
        At least the last token is always recomputed (its logits are needed). A row that asks for
        its prompt's log-probabilities computes every prompt token (the cache holds keys and
        values, not the logits a cached block's tokens were scored with)."""
        assert not seq.block_table
        seq.block_hashes = []
        bs = self.block_size
        cacheable = ((seq.num_tokens - 1) // bs
                     if self.prefix_caching and not seq.params.prompt_logprobs else 0)
        hits = 0
        for i in range(cacheable):
            h = self._hash(seq, i)
            block = self.hash_to_block.get(h)
            if block is None:
                break
            seq.block_hashes.append(h)
            self._take(block)
            seq.block_table.append(block)
            hits += 1
        while len(seq.block_table) < self.blocks_for(seq.num_tokens):
            seq.block_table.append(self._fresh())
        seq.num_computed = seq.num_prefix_hits = hits * bs
        seq.num_hashed_blocks = hits
        self.prefix_hit_tokens += hits * bs
        self.prefix_query_tokens += seq.num_tokens

    def fork(self, parent: Sequence, child: Sequence) -> bool:
        """Give `child` (a sibling sample of the same prompt) the parent's computed full prompt
        blocks, shared by reference count, and fresh blocks for the rest; the child recomputes
        only the prompt's last partial block (at least its last token, whose logits it samples
        from). False (nothing taken) when too few blocks are free."""
        assert not child.block_table
        bs = self.block_size
        shared = min((child.num_tokens - 1) // bs, parent.prompt_len // bs,
                     parent.num_computed // bs, len(parent.block_table))
        if self.blocks_for(child.num_tokens) - shared > self.num_free:
            return False
        for block in parent.block_table[:shared]:
            self._take(block)
        child.block_table = list(parent.block_table[:shared])
        while len(child.block_table) < self.blocks_for(child.num_tokens):
            child.block_table.append(self._fresh())
        child.block_hashes = list(parent.block_hashes[:shared])
        child.num_hashed_blocks = len(child.block_hashes)
        child.num_computed = child.num_prefix_hits = shared * bs
        self.prefix_hit_tokens += shared * bs
        self.prefix_query_tokens += child.num_tokens
        return True

    def reserve(self, seq: Sequence, upto: int) -> bool:
        """Blocks for tokens [0, upto) of seq; False (nothing taken) when too few are free."""
        need = self.blocks_for(upto) - len(seq.block_table)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._fresh())
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish seq's computed full blocks to the prefix cache."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        for i in range(seq.num_hashed_blocks, full):
            h = self._hash(seq, i)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def release(self, seq: Sequence) -> None:
        # Free in reverse so a sequence's tail blocks are reused before its (shareable) head.
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0
        seq.num_computed = 0
