"""Structured output: a row's constraint (a JSON Schema, a regular expression or a list of
choices) compiled by llguidance into a matcher that says, before each token, which tokens may
come next, and that follows the tokens the row takes.

Torch-free: the job's constraint is compiled here at configuration time (`constraint_error`,
no tokenizer needed), so a bad one stops the job before any weight loads. The engine builds one
`Grammars` per rank over its tokenizer; every rank feeds its matchers the same tokens, so every
rank computes the same mask. llguidance was chosen over xgrammar by measurement on the InternLM2
vocabulary (internlm2_tp/bench/grammar_libs.py; the README's "Structured output" section).
"""
from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from typing import Any, Sequence

import llguidance as llg

from internlm2_tp.engine.params import CONSTRAINTS

# JSON without free whitespace: a completion's length is bounded by its schema, and every rank's
# matcher (and every rerun's) accepts the same compact text.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
_UNUSED_PIECE = re.compile(r"\[UNUSED_TOKEN_\d+\]")
MAX_TEMPLATES = 256                # compiled constraints a rank keeps
_SPECIAL_PREFIX = b"\xff"           # llguidance's mark of a special token: never grammar text


def grammar_text(kind: str, value: Any) -> str:
    """The llguidance grammar of one constraint. A ValueError (not JSON, not an object) names
    no key: callers add it."""
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON Schema is a JSON object, got {type(schema).__name__}")
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=dict(_JSON_OPTIONS))
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        # Each choice a JSON-quoted literal: Lark reads JSON string escapes, so any text works.
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
    raise ValueError(f"unknown constraint kind {kind!r}; known: {list(CONSTRAINTS)}")


@functools.lru_cache(maxsize=256)
def constraint_error(kind: str, value: Any) -> str | None:
    """Why the constraint does not compile (the compiler's message, one line), or None.
    Cached by text: rows sharing a schema are checked once."""
    try:
        msg = llg.LLMatcher.validate_grammar(grammar_text(kind, value))
    except ValueError as e:
        msg = str(e)
    return " ".join(msg.split()) or None


def token_bytes(tokenizer: Any) -> tuple[list[bytes], list[int]]:
    """Each id's bytes as the completion's text holds them (SentencePiece's '▁' is a space,
    byte-fallback pieces one byte), and the ids a grammar may never produce: control and unknown
    pieces, the chat tokens, and InternLM2's [UNUSED_TOKEN_n] placeholders."""
    sp = tokenizer.sp
    special = set(tokenizer.special_tokens.values())
    out: list[bytes] = []
    never: list[int] = []
    for i in range(tokenizer.vocab_size):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))      # "<0xAB>"
        elif (i in special or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
              or _UNUSED_PIECE.fullmatch(piece)):
            out.append(_SPECIAL_PREFIX + piece.encode())
            never.append(i)
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out, never


class _Vocab:
    """What llguidance's TokenizerWrapper reads: the pieces, the special ids, and an encoder
    (used to tokenize text a grammar forces)."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], vocab_size: int):
        self.tokens, self.special_token_ids = token_bytes(tokenizer)
        extra = range(len(self.tokens), vocab_size)     # model rows past the tokenizer's pieces
        self.tokens += [_SPECIAL_PREFIX + f"<pad {i}>".encode() for i in extra]
        self.special_token_ids += list(extra)
        self.eos_token_id = int(eos_ids[0])
        self.bos_token_id = tokenizer.bos_id
        self._sp = tokenizer.sp

    def __call__(self, text: bytes) -> list[int]:
        return self._sp.encode(text.decode("utf-8", errors="replace"))


class Grammars:
    """One rank's compiler: one matcher template per distinct constraint (keyed by its kind and
    text), deep-copied for each row, so a schema shared by a million rows compiles once."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int], vocab_size: int | None = None):
        """vocab_size: the model's (its output rows), when it exceeds the tokenizer's."""
        if not eos_ids:
            raise ValueError("structured output needs at least one eos token id")
        self.vocab_size = max(vocab_size or 0, tokenizer.vocab_size)
        wrapper = llg.TokenizerWrapper(_Vocab(tokenizer, eos_ids, self.vocab_size))
        # eos_token lists every eos id: each is allowed exactly where the grammar may end.
        self.tokenizer = llg.LLTokenizer(wrapper, n_vocab=self.vocab_size,
                                         eos_token=[int(i) for i in eos_ids])
        # Least recently used first; bounded, as rows may each bring a schema of their own.
        self._templates: OrderedDict[tuple[str, Any], llg.LLMatcher] = OrderedDict()
        self.compiled = 0          # distinct constraints compiled (the cache's misses)

    def matcher(self, kind: str, value: Any) -> llg.LLMatcher:
        """A fresh matcher for the constraint; ValueError with the compiler's message."""
        key = (kind, tuple(value) if isinstance(value, (list, tuple)) else value)
        template = self._templates.get(key)
        if template is None:
            template = llg.LLMatcher(self.tokenizer, grammar_text(kind, value), log_level=0)
            if template.is_error():
                raise ValueError(" ".join(template.get_error().split()))
            self._templates[key] = template
            self.compiled += 1
            while len(self._templates) > MAX_TEMPLATES:
                self._templates.popitem(last=False)
        self._templates.move_to_end(key)
        return template.deep_copy()
