"""Rows <-> engine requests: tokenizing (text, chat template or given ids), per-row sampling
parameters, and turning finished token ids back into output rows (detokenized, stop strings cut).

A row that cannot run on its own (bad prompt form, out-of-vocab ids; longer than the context,
which the engine checks) becomes an output row with finish_reason "error" and a message naming
the row and the cause; the job goes on. Prompts are never truncated.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Collection

from internlm2_tp.engine.grammar import constraint_error
from internlm2_tp.engine.params import CONSTRAINTS, SamplingParams
from internlm2_tp.runtime.data.input_types import InputRow
from internlm2_tp.runtime.data.output import OutputRow
from internlm2_tp.tokenizer import Tokenizer


@dataclass
class Request:
    row_id: Any
    prompt_ids: list[int]
    params: SamplingParams
    samples: tuple[int, ...] = (0,)    # the sample indices still to produce (of params.n)


def row_seed(job_seed: int, row_id: Any) -> int:
    """A row's default seed: a stable function of the job seed and the row id, so a row samples
    the same whatever batch, replica or rerun it lands in."""
    h = hashlib.blake2b(f"{job_seed}\x00{type(row_id).__name__}\x00{row_id}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little", signed=True)


def error_row(row_id: Any, message: str, prompt_tokens: int = 0, sample_index: int = 0
              ) -> OutputRow:
    return OutputRow(id=row_id, completion="", completion_token_ids=[],
                     prompt_tokens=prompt_tokens, completion_tokens=0, finish_reason="error",
                     error=message, sample_index=sample_index)


def to_request(row: InputRow, tok: Tokenizer, base: SamplingParams, vocab_size: int,
               done: Collection[int] = (), reward_token: int | None = None
               ) -> Request | list[OutputRow]:
    """The engine request for a row's samples not in `done` (sample indices already written;
    none left: a request with no samples), or the error rows that replace them, one per
    sample. A row has n samples: its own `n` column's, else the job's. `reward_token`: a
    reward model's job (see prompt_ids)."""
    r = _request(row, tok, base, vocab_size, reward_token)
    n = r.params.n if isinstance(r, Request) else row.overrides.get("n", base.n)
    samples = tuple(i for i in range(n) if i not in done)
    if isinstance(r, Request):
        return replace(r, samples=samples)
    return [replace(r, sample_index=i) for i in samples]


def prompt_ids(row: InputRow, tok: Tokenizer, reward_token: int | None = None) -> list[int]:
    """A row's prompt: text encoded (with bos), messages through the chat template, token ids
    as given. For a reward model (`reward_token` set) the conversation is rendered without the
    generation prompt and the reward token is appended, unless the row already ends with it
    (the published models score the hidden state there)."""
    if row.prompt is not None:
        ids = tok.encode(row.prompt)
    elif row.messages is not None:
        ids = tok.apply_chat_template(row.messages, add_generation_prompt=reward_token is None)
    else:
        ids = list(row.token_ids or [])
    if reward_token is not None and ids and ids[-1] != reward_token:
        ids.append(reward_token)
    return ids


def _request(row: InputRow, tok: Tokenizer, base: SamplingParams, vocab_size: int,
             reward_token: int | None = None) -> Request | OutputRow:
    """The engine request for a row (all its samples), or the error row that replaces it."""
    if row.error is not None:
        return error_row(row.id, row.error)
    try:
        ids = prompt_ids(row, tok, reward_token)
    except ValueError as e:
        return error_row(row.id, f"row id {row.id!r}: {e}")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        return error_row(row.id, f"row id {row.id!r}: token id {bad} is outside the vocabulary "
                                 f"[0, {vocab_size})", len(ids))
    err = _constraint_problem(row.overrides)
    if err:
        return error_row(row.id, f"row id {row.id!r}: {err}", len(ids))
    if any(c in row.overrides for c in CONSTRAINTS):   # the row's constraint replaces the job's
        base = replace(base, json_schema="", regex="", choice=())
    try:   # the row's own values (checked by the reader) over the job's; a seed per row
        params = replace(base, **{"seed": row_seed(base.seed, row.id), **row.overrides})
    except ValueError as e:   # a value out of range with the others (n > 1 when greedy)
        msg = str(e).replace("SamplingParams.", "")
        return error_row(row.id, f"row id {row.id!r}: {msg}", len(ids))
    return Request(row.id, ids, params)


def _constraint_problem(overrides: dict[str, Any]) -> str | None:
    """Why a row's own constraint columns cannot be used (two set, or one that does not
    compile: the compiler's message), or None. Compiled results are cached by text."""
    given = [c for c in CONSTRAINTS if overrides.get(c)]
    if len(given) > 1:
        return (f"columns {given} are set together; a row takes at most one of "
                f"{list(CONSTRAINTS)}")
    if not given:
        return None
    err = constraint_error(given[0], overrides[given[0]])
    return f"column {given[0]!r}: {err}" if err else None


def finished_row(row_id: Any, prompt_tokens: int, output_ids: list[int], finish_reason: str,
                 stop_text: str | None, tok: Tokenizer, eos_ids: tuple[int, ...],
                 **scores: Any) -> OutputRow:
    """Text of the completion: specials skipped (so a final eos / <|im_end|> never shows), and cut
    before the stop string that ended it. `scores`: sample_index and the log-probabilities
    (token_logprobs, top_logprobs as (token id, logprob) pairs, prompt_token_logprobs)."""
    top = scores.get("top_logprobs")
    if top is not None:
        scores["top_logprobs"] = [[{"token_id": t, "logprob": v} for t, v in pos] for pos in top]
    text = tok.decode(output_ids)
    if stop_text is not None:
        cut = text.find(stop_text)
        if cut >= 0:
            text = text[:cut]
    return OutputRow(id=row_id, completion=text, completion_token_ids=list(output_ids),
                     prompt_tokens=prompt_tokens, completion_tokens=len(output_ids),
                     finish_reason=finish_reason, error=None, **scores)
