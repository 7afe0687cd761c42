"""One request's state inside the engine (`Sequence`: one sample of it), and what the engine
returns for each finished sample (`Finished`)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from internlm2_tp.engine.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int                      # engine-local, admission order (the scheduler's FCFS key)
    request_id: Any                  # the row id, carried back to the caller
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0            # tokens whose keys/values are in the cache
    num_prefix_hits: int = 0         # of those, tokens that came from the prefix cache
    num_hashed_blocks: int = 0       # leading full blocks already registered in the prefix cache
    block_hashes: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    preemptions: int = 0
    detok: Any = None                # IncrementalDetokenizer when the row has stop strings
    arrival: float = 0.0             # perf_counter() when added
    first_token_at: float = 0.0      # perf_counter() when its first new token was sampled
    sample_index: int = 0            # which of its row's n samples this is
    parent: "Sequence | None" = None  # the sibling whose computed prompt blocks it shares
    forks: list["Sequence"] = field(default_factory=list)  # siblings queued once the prompt is in
    token_logprobs: list[float] | None = None       # of each output token, when asked
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None  # [prompt_len], entry 0 None, when asked
    reward: float | None = None      # a reward model's score of the whole prompt
    matcher: Any = None              # llguidance matcher of its constraint (fed its output_ids)
    error: str | None = None         # why it finished with "error"

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[i] if i < p else self.output_ids[i - p]

    def tokens(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]

    def rope_length(self, pos: int) -> int:
        """The length dynamic NTK uses for position `pos`: the prompt length for prompt
        tokens, pos + 1 for generated ones (as the official model does for one request)."""
        return max(len(self.prompt_ids), pos + 1)


@dataclass
class Finished:
    request_id: Any
    prompt_tokens: int
    output_ids: list[int]
    finish_reason: str                # "stop", "length", or "error" (the row alone is bad)
    stop_text: str | None = None      # the stop string that ended it, if any
    error: str | None = None
    ttft_s: float = 0.0               # time from add_request to the first new token
    latency_s: float = 0.0            # time from add_request to finished
    sample_index: int = 0             # which of the request's n samples
    token_logprobs: list[float] | None = None           # params.logprobs >= 0
    top_logprobs: list[list[tuple[int, float]]] | None = None   # params.logprobs > 0
    prompt_logprobs: list[float | None] | None = None   # params.prompt_logprobs
    reward: float | None = None                         # a reward model's score
