"""What a request asks of the sampler and the stop rules: `SamplingParams`, the one table of its
fields' rules (`RULES`: kind and range), and which fields a row may override with a column of its
own (`ROW_OVERRIDES`; null: the job's value).

Everything that checks a sampling value reads this table: the job's `generation.*` settings
(through SamplingParams), the input plan (a Parquet column's type), the row reader (a row's value,
from Parquet or a JSON line) and the engine (SamplingParams). Letting rows override one more field
is one more name in ROW_OVERRIDES; a new field is its rule here and its field in SamplingParams.
Torch-free: the job's configuration is checked with it before torch is imported.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Any, Callable


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Kind:
    """A value type: what a Python value and a JSON value of it must be, and the Python form."""
    name: str                           # as messages say it: "an integer"
    accepts: Callable[[Any], bool]      # a Python value (SamplingParams, a Parquet cell)
    json_accepts: Callable[[Any], bool]  # a value parsed from JSON (4.0 is an integer there)
    convert: Callable[[Any], Any]       # to the SamplingParams field's type


def _seq_of(item: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (list, tuple)) and all(item(x) for x in v)


INTEGER = Kind("an integer", _is_int, lambda v: _is_int(v) or (_is_num(v) and float(v).is_integer()),
               int)
NUMBER = Kind("a number", _is_num, _is_num, float)
BOOLEAN = Kind("a boolean", lambda v: isinstance(v, bool), lambda v: isinstance(v, bool), bool)
INTEGER_LIST = Kind("a list of integers", _seq_of(_is_int), _seq_of(_is_int), tuple)
STRING = Kind("a string", lambda v: isinstance(v, str), lambda v: isinstance(v, str), str)
STRING_LIST = Kind("a list of strings", _seq_of(lambda x: isinstance(x, str)),
                   _seq_of(lambda x: isinstance(x, str)), tuple)


MAX_N = 1024            # samples per row
MAX_LOGPROBS = 64       # top log-probabilities per position


@dataclass(frozen=True)
class Rule:
    kind: Kind
    ok: Callable[[Any], bool] = lambda v: True   # the range, once the kind is right
    text: str = ""                                # what `ok` demands: "must be >= 1"


RULES: dict[str, Rule] = {
    "max_new_tokens": Rule(INTEGER, lambda v: v >= 0, "must be >= 0 (0: score the prompt only)"),
    "temperature": Rule(NUMBER, lambda v: math.isfinite(v) and v >= 0, "must be finite and >= 0"),
    "top_p": Rule(NUMBER, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": Rule(INTEGER, lambda v: v >= 0, "must be >= 0 (0 disables top-k)"),
    "repetition_penalty": Rule(NUMBER, lambda v: math.isfinite(v) and v > 0,
                               "must be finite and > 0"),
    "seed": Rule(INTEGER, lambda v: -(1 << 63) <= v < (1 << 63), "must be in the int64 range"),
    "ignore_eos": Rule(BOOLEAN),
    "stop_token_ids": Rule(INTEGER_LIST, lambda v: all(x >= 0 for x in v),
                           "must hold non-negative token ids"),
    "stop": Rule(STRING_LIST, lambda v: all(v), "must hold non-empty strings"),
    "n": Rule(INTEGER, lambda v: 1 <= v <= MAX_N, f"must be in [1, {MAX_N}]"),
    "logprobs": Rule(INTEGER, lambda v: -1 <= v <= MAX_LOGPROBS,
                     f"must be in [-1, {MAX_LOGPROBS}] (-1: off, 0: the sampled token's only)"),
    "prompt_logprobs": Rule(BOOLEAN),
    # Structured output (engine/grammar.py); "" / () is none. Whether one compiles is the
    # compiler's to say: the job's at configuration time, a row's when the row is read.
    "json_schema": Rule(STRING),
    "regex": Rule(STRING),
    "choice": Rule(STRING_LIST, lambda v: all(v) and len(set(v)) == len(v),
                   "must hold distinct non-empty strings"),
}
CONSTRAINTS: tuple[str, ...] = ("json_schema", "regex", "choice")   # at most one per request

# Fields a row may set in a column of its own (the column is named as the field).
ROW_OVERRIDES: tuple[str, ...] = ("max_new_tokens", "temperature", "top_p", "top_k", "seed",
                                  "repetition_penalty", "stop", "stop_token_ids", "ignore_eos",
                                  "n", "logprobs", *CONSTRAINTS)


def rule_error(name: str, value: Any) -> str | None:
    """Why `value` is not a valid `name` ("must be ..."), or None."""
    rule = RULES[name]
    if not rule.kind.accepts(value):
        return f"must be {rule.kind.name}"
    return None if rule.ok(value) else rule.text


def row_value(name: str, value: Any) -> tuple[Any, str | None]:
    """A row's override of field `name` (a Parquet cell or a JSON value whose kind the reader has
    checked) as SamplingParams takes it, and why it is out of range (None: fine)."""
    value = RULES[name].kind.convert(value)
    return value, rule_error(name, value)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0 -> greedy
    top_p: float = 1.0                # (0, 1]
    top_k: int = 0                    # 0 = off
    repetition_penalty: float = 1.0   # HF semantics, > 0
    seed: int = 0                     # any int64
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()        # stop strings: handled by the engine
    n: int = 1                        # samples of the row (sample i's seed: sample_seed)
    logprobs: int = -1                # -1 off; >= 0 the sampled tokens'; K > 0 also the top K
    prompt_logprobs: bool = False     # the log-probability of every prompt token
    json_schema: str = ""             # the completion is JSON valid under this schema (its text)
    regex: str = ""                   # the whole completion matches this regular expression
    choice: tuple[str, ...] = ()      # the completion is exactly one of these

    def __post_init__(self) -> None:
        # Accept lists (and a bare stop string); store tuples so the dataclass stays hashable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name in ("stop", "stop_token_ids", "choice"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for f in fields(self):
            err = rule_error(f.name, getattr(self, f.name))
            if err:
                raise ValueError(f"SamplingParams.{f.name} {err}, got {getattr(self, f.name)!r}")
        if self.n > 1 and self.greedy:
            raise ValueError(f"SamplingParams.n={self.n} needs temperature > 0: greedy samples "
                             "would all be the same")
        given = [c for c in CONSTRAINTS if getattr(self, c)]
        if len(given) > 1:
            raise ValueError(f"SamplingParams: {' and '.join(given)} are both set; give at most "
                             f"one of {', '.join(CONSTRAINTS)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def constraint(self) -> tuple[str, str | tuple[str, ...]] | None:
        """(field name, value) of the structured-output constraint, or None."""
        return next(((c, getattr(self, c)) for c in CONSTRAINTS if getattr(self, c)), None)


def sample_seed(seed: int, sample_index: int) -> int:
    """Sample `sample_index`'s seed from its row's: the row's own for sample 0 (so n=1 samples as
    before), else a hash of both. A function of (row seed, index) alone, so a sample draws the
    same tokens in any batch, replica, tp degree or resumed run."""
    if sample_index == 0:
        return seed
    h = hashlib.blake2b(f"{seed}\x00{sample_index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little", signed=True)
