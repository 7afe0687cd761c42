"""tokenizer_config.json as the published InternLM2 checkpoints write it, and the six chat special
tokens of the sentencepiece model.

The .model holds the chat tokens as placeholder pieces ([UNUSED_TOKEN_141..146]); their names
come from tokenizer_config.json's added_tokens_decoder, or, without one, from the known InternLM2
layout (SPECIAL_TOKEN_PIECES). auto_map is ignored: no code from a checkpoint is run; its
chat_template is kept as text, for chat_template.py to render in a sandbox.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sentencepiece as spm

from internlm2_tp.errors import TokenizerError

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"

# (placeholder piece in the .model, name given by the published tokenizer_config.json), in id order:
# the real model has them at 92538..92543.
SPECIAL_TOKEN_PIECES: tuple[tuple[str, str], ...] = (
    ("[UNUSED_TOKEN_141]", "<|plugin|>"),
    ("[UNUSED_TOKEN_142]", "<|interpreter|>"),
    ("[UNUSED_TOKEN_143]", "<|action_end|>"),
    ("[UNUSED_TOKEN_144]", "<|action_start|>"),
    ("[UNUSED_TOKEN_145]", "<|im_end|>"),
    ("[UNUSED_TOKEN_146]", "<|im_start|>"),
)

def _token_content(value: Any, key: str, source: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):  # serialized AddedToken
        return value["content"]
    raise TokenizerError(f"{source}: {key} must be a string or {{'content': str}}, got {value!r}")


@dataclass(frozen=True)
class TokenizerConfig:
    """The fields of tokenizer_config.json we use (auto_map is ignored)."""
    add_bos_token: bool = True
    add_eos_token: bool = False
    bos_token: str = "<s>"
    eos_token: str = "</s>"
    pad_token: str | None = "</s>"
    unk_token: str = "<unk>"
    added_tokens: dict[int, tuple[str, bool]] = field(default_factory=dict)  # id -> (content, special)
    additional_special_tokens: tuple[str, ...] = ()
    chat_template: Any = None             # as written (a string, or transformers' named list)

    def __post_init__(self) -> None:
        for name in ("add_bos_token", "add_eos_token"):
            if not isinstance(getattr(self, name), bool):
                raise TokenizerError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("bos_token", "eos_token", "unk_token"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TokenizerError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")

    @classmethod
    def from_json(cls, raw: Any, source: str = CONFIG_FILE) -> TokenizerConfig:
        if not isinstance(raw, Mapping):
            raise TokenizerError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        kw: dict[str, Any] = {k: raw[k] for k in ("add_bos_token", "add_eos_token") if k in raw}
        for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if k in raw:
                kw[k] = _token_content(raw[k], k, source)
        added: dict[int, tuple[str, bool]] = {}
        decoder = raw.get("added_tokens_decoder") or {}
        if not isinstance(decoder, Mapping):
            raise TokenizerError(f"{source}: added_tokens_decoder must be an object")
        for key, entry in decoder.items():
            if not str(key).isdigit() or not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
                raise TokenizerError(f"{source}: added_tokens_decoder[{key!r}] must map an id to "
                                     f"{{'content': str, ...}}, got {entry!r}")
            added[int(key)] = (entry["content"], bool(entry.get("special", True)))
        extra = raw.get("additional_special_tokens") or []
        if not isinstance(extra, list):
            raise TokenizerError(f"{source}: additional_special_tokens must be a list")
        kw["additional_special_tokens"] = tuple(
            c for i, t in enumerate(extra)
            if (c := _token_content(t, f"additional_special_tokens[{i}]", source)) is not None)
        try:
            return cls(**kw, added_tokens=added, chat_template=raw.get("chat_template"))
        except TokenizerError as e:
            raise TokenizerError(f"{source}: {e}") from None


def special_token_ids(sp: spm.SentencePieceProcessor) -> dict[int, str]:
    """{id: content} of the six chat special tokens in a loaded model: the piece spelled as the
    content itself if there is one, else the [UNUSED_TOKEN_*] placeholder."""
    found: dict[int, str] = {}
    for placeholder, content in SPECIAL_TOKEN_PIECES:
        for piece in (content, placeholder):
            i = sp.piece_to_id(piece)
            if i != sp.unk_id() and sp.id_to_piece(i) == piece:
                found[i] = content
                break
        else:
            raise ValueError(f"tokenizer model has no piece for {content!r} (nor {placeholder!r})")
    return found
