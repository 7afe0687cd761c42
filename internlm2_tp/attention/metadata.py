"""What attention needs to know about one step, passed explicitly from the engine to the model.

The engine flattens every scheduled token of every sequence into one list of T tokens: first the
`num_decodes` sequences with exactly one new token, then the prefilling ones (whole prompts,
chunks, prefix-cache continuations). Per token: position, the length dynamic NTK uses, cache
slot. Per sequence: block table, keys visible after the step, new tokens. Lengths are kept on
the host as well as on the device, so no backend reads a device value back to plan a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

ToDevice = Callable[[torch.Tensor, torch.device], torch.Tensor]


def plain_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return host.to(device)


@dataclass
class AttentionMetadata:
    positions: torch.Tensor          # [T] int64 absolute position of each token
    rope_lengths: torch.Tensor       # [T] int64 the length T dynamic NTK uses for the token
    slot_mapping: torch.Tensor       # [T] int64 flat cache slot (block * block_size + offset)
    block_tables: torch.Tensor       # [B, max_blocks] int64, padded with 0
    context_lens: torch.Tensor       # [B] int64 keys visible after this step (cached + new)
    query_lens: torch.Tensor         # [B] int64 new tokens of each sequence in this step
    logits_indices: torch.Tensor | None  # [B'] index into T of the tokens to sample; None: all
    num_decodes: int                 # the first num_decodes sequences have one new token
    context_lens_host: list[int]     # the same lengths, on the host
    query_lens_host: list[int]
    max_position: int                # largest position in the step
    max_rope_length: int             # largest rope length in the step
    plan: Any = None                 # the attention backend's per-step data (prepare())

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_host)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def max_decode_context(self) -> int:
        return max(self.context_lens_host[:self.num_decodes], default=0)

    @property
    def max_prefill_query(self) -> int:
        return max(self.query_lens_host[self.num_decodes:], default=0)

    @property
    def max_prefill_context(self) -> int:
        return max(self.context_lens_host[self.num_decodes:], default=0)

    @classmethod
    def build(cls, *, positions: list[int], rope_lengths: list[int], slots: list[int],
              block_tables: list[list[int]], context_lens: list[int], query_lens: list[int],
              logits_indices: list[int] | None, device: torch.device,
              to_device: ToDevice = plain_to_device, num_decodes: int | None = None
              ) -> AttentionMetadata:
        """From host lists (the engine's, or a test's). The leading 1-token sequences are the
        decodes unless `num_decodes` says otherwise (0: a prefill of every sequence)."""
        nd = num_decodes
        if nd is None:
            nd = 0
            while nd < len(query_lens) and query_lens[nd] == 1:
                nd += 1
            if any(n == 1 for n in query_lens[nd:]):
                raise ValueError(f"the 1-token sequences must come first: {query_lens}")
        if any(n < 1 for n in query_lens) or any(n != 1 for n in query_lens[:nd]):
            raise ValueError(f"bad query lengths {query_lens} for {nd} decodes")
        width = max((len(t) for t in block_tables), default=1)

        def dev(x: list) -> torch.Tensor:
            return to_device(torch.tensor(x, dtype=torch.long), device)

        return cls(
            positions=dev(positions), rope_lengths=dev(rope_lengths), slot_mapping=dev(slots),
            block_tables=dev([t + [0] * (width - len(t)) for t in block_tables]),
            context_lens=dev(context_lens), query_lens=dev(query_lens),
            logits_indices=None if logits_indices is None else dev(logits_indices),
            num_decodes=nd, context_lens_host=list(context_lens),
            query_lens_host=list(query_lens), max_position=max(positions, default=0),
            max_rope_length=max(rope_lengths, default=0))


def dense_metadata(lengths: list[int], block_size: int, device: torch.device,
                   all_logits: bool = False) -> AttentionMetadata:
    """Metadata for a one-shot prefill of whole sequences into a fresh cache laid out
    contiguously (sequence i in blocks after sequence i-1). Used by tests and checks."""
    tables, slots, positions, first = [], [], [], 0
    for n in lengths:
        nb = -(-n // block_size)
        tables.append(list(range(first, first + nb)))
        slots.extend(first * block_size + j for j in range(n))
        positions.extend(range(n))
        first += nb
    last = [sum(lengths[:i + 1]) - 1 for i in range(len(lengths))]
    return AttentionMetadata.build(
        positions=positions, rope_lengths=[n for n in lengths for _ in range(n)], slots=slots,
        block_tables=tables, context_lens=list(lengths), query_lens=list(lengths),
        logits_indices=None if all_logits else last, device=device, num_decodes=0)
