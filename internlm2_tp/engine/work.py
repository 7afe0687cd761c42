"""What the engine computed, counted step by step (the benchmark's roofline reads it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class RunWork:
    """Additive counts of computed work; torch-free host arithmetic, a few sums per step."""
    tokens: int = 0            # tokens through the layers (prompt tokens after hits + decode)
    attention_keys: int = 0    # sum over computed tokens of the keys each attends to
    logit_rows: int = 0        # rows whose LM head was computed
    kv_read_tokens: int = 0    # context tokens whose keys and values attention read
    forwards: int = 0          # forward passes (each streams the weights once)

    def add_step(self, new: Sequence[int], context: Sequence[int], logit_rows: int) -> None:
        """One forward: sequence i computes new[i] tokens and sees context[i] keys after it
        (causal: its j-th new token sees context[i] - new[i] + j + 1 keys)."""
        self.tokens += sum(new)
        self.attention_keys += sum(n * (c - n) + n * (n + 1) // 2 for n, c in zip(new, context))
        self.kv_read_tokens += sum(context)
        self.logit_rows += logit_rows
        self.forwards += 1

    def minus(self, other: RunWork) -> RunWork:
        return RunWork(*(a - b for a, b in zip(vars(self).values(), vars(other).values())))
