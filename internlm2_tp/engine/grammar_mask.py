"""The token masks of constrained rows: filled on the host by llguidance (one bit per vocab id),
applied where the logits live (CPU, CUDA or NPU) to this rank's vocab shard.

Every rank fills the same mask from matchers fed the same tokens and masks its own columns of it,
so the group's argmax or draw over the masked logits is the same on every rank: the decision is
one, with no extra collective.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import llguidance as llg
import numpy as np
import torch


def words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class MaskFiller:
    """Fills masks on a side thread: llguidance computes them with the GIL released, so the mask
    of step t is worked out while the model runs step t's forward."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._executor = llg.LLExecutor()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")

    def fill(self, matchers: Sequence[Any]) -> torch.Tensor:  # -> [R, words] int32 (host)
        bitmask = torch.zeros(len(matchers), words(self.vocab_size), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                               bitmask.data_ptr(), bitmask.shape[1] * 4,
                                               len(matchers))
        return bitmask

    def submit(self, matchers: Sequence[Any]) -> Future:
        return self._thread.submit(self.fill, list(matchers))


def forbidden(bitmask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[R, words] int32 -> [R, end - start] bool: which ids of [start, end) the mask forbids.
    On the host numpy unpacks the bits (one pass over R * V bytes); on a device, shifts there."""
    if bitmask.device.type == "cpu":
        lo, hi = start // 8, (end + 7) // 8
        inverted = ~bitmask.numpy().view(np.uint8)[:, lo:hi]             # little-endian bytes
        bits = np.unpackbits(inverted, axis=1, bitorder="little")       # [R, 8 * bytes] 0/1
        return torch.from_numpy(bits[:, start - 8 * lo: end - 8 * lo]).view(torch.bool)
    return forbidden_by_shifts(bitmask, start, end)


def forbidden_by_shifts(bitmask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """forbidden() in torch ops, on the bitmask's own device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1                          # [R, words, 32]
    return bits.view(bitmask.shape[0], -1)[:, start:end] == 0


@torch.inference_mode()   # the model's logits are inference tensors
def apply(local: torch.Tensor, rows: list[int], bitmask: torch.Tensor, start: int, end: int,
          to_device: Callable[[torch.Tensor, torch.device], torch.Tensor]) -> None:
    """Set to -inf the logits of ids the mask forbids, in place. local [B, per_rank] this rank's
    shard (ids [start, end), then padding); rows: the B indices of the mask's R rows."""
    if end <= start or not rows:
        return
    no = forbidden(to_device(bitmask, local.device), start, end)         # [R, end - start]
    if rows == list(range(local.shape[0])):
        local[:, : end - start].masked_fill_(no, float("-inf"))
        return
    for j, r in enumerate(rows):      # in place, row by row: no [R, V] gather and scatter
        local[r, : end - start].masked_fill_(no[j], float("-inf"))


class Constrained:
    """The engine's side of structured output: a matcher for each constrained sequence, the
    masks of a step (started before its forward, applied after), and the matcher's verdict on
    each new token. Built on first use: a job without constraints never builds it."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], vocab_size: int,
                 start: int, end: int, to_device: Callable):
        from internlm2_tp.engine.grammar import Grammars
        self.grammars = Grammars(tokenizer, eos_ids, vocab_size)
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.filler = MaskFiller(self.grammars.vocab_size)   # the larger of model and tokenizer
        self.start, self.end, self.to_device = start, end, to_device

    def matcher(self, request_id: Any, params: Any) -> Any:
        """A new matcher for a request's constraint; one that does not compile on this rank is
        the row's error (a ValueError naming the row and the field)."""
        kind, value = params.constraint
        try:
            return self.grammars.matcher(kind, value)
        except ValueError as e:
            raise ValueError(f"row id {request_id!r}: {kind}: {e}") from None

    def begin(self, sampled: Sequence[Any]) -> tuple[list[int], Future] | None:
        """Start the masks of the rows of `sampled` that have a matcher and emit a token."""
        rows = [i for i, s in enumerate(sampled)
                if s.matcher is not None and s.params.max_new_tokens > 0]
        if not rows:
            return None
        return rows, self.filler.submit([sampled[i].matcher for i in rows])

    def mask(self, local: torch.Tensor, pending: tuple[list[int], Future] | None) -> None:
        """local [B, per_rank]: the sampled rows' logits shard, masked in place."""
        if pending is not None:
            rows, future = pending
            apply(local, rows, future.result(), self.start, self.end, self.to_device)

    def advance(self, seq: Any, tok: int) -> str | None:
        """Feed the row's new token to its matcher: "stop" when it ends the grammar (an eos
        where the grammar may end, or the grammar's last token), "error" (the row's error set)
        when the matcher refuses it, else None."""
        if tok in self.eos_ids:
            return "stop"
        if not seq.matcher.consume_token(tok):
            seq.error = (f"row id {seq.request_id!r}: token {tok} was refused by the "
                         f"{seq.params.constraint[0]} constraint ({seq.matcher.get_error()})")
            return "error"
        return "stop" if seq.matcher.is_stopped() else None
