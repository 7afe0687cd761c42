"""InternLM2 tokenizer on sentencepiece: encode with special tokens, decode, chat prompts (the
template itself: chat_template.py) and streaming (incremental) detokenisation.

The InternLM2 .model uses identity normalisation and no dummy prefix, so text is encoded by
sentencepiece exactly as given ("hello" -> 'hello', " hello" -> '▁hello') and decoding keeps a
leading space. The six chat tokens are placeholder pieces ([UNUSED_TOKEN_141..146]) in the .model;
their names come from tokenizer_config.json's added_tokens_decoder (or, without a config, from the
known InternLM2 layout). Special-token strings in text are split out first and map to their id.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from internlm2_tp.chat_template import AUTO, BUILTIN, IM_END, IM_START, ChatTemplate, load_chat_template
from internlm2_tp.errors import MissingFileError, TokenizerError
from internlm2_tp.tokenizer_config import CONFIG_FILE, MODEL_FILE, TokenizerConfig, special_token_ids


def load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    """Load a .model with sentencepiece's load-time warnings off. The published InternLM2 model's
    only one is "Piece at index 354 is a null character (\\0) and byte_fallback is enabled.
    Treating it as an UNUSED piece", printed by every process that loads it, which a user cannot
    act on and which changes nothing: a NUL in text is encoded by byte fallback as <0x00> (id 3),
    so id 354 is never produced, and decoding 354 still gives "\\0" (the official tokenizer is
    the same library and behaves the same). Errors still raise."""
    spm.set_min_log_level(2)          # errors only, for the load
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    finally:
        spm.set_min_log_level(0)      # sentencepiece's default


class Tokenizer:
    def __init__(self, model_file: str | Path, config: TokenizerConfig | None = None,
                 chat_template: ChatTemplate | None = None) -> None:
        """`chat_template`: None is the built-in InternLM2 template."""
        path = Path(model_file)
        if not path.is_file():
            raise MissingFileError(f"tokenizer model {path} does not exist")
        try:
            self.sp = load_sentencepiece(path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
        self.vocab_size: int = self.sp.get_piece_size()
        cfg = config or TokenizerConfig()
        added = dict(cfg.added_tokens)
        if not added:  # no added_tokens_decoder: the InternLM2 layout, if the model has its pieces
            try:
                added = {i: (c, True) for i, c in special_token_ids(self.sp).items()}
            except ValueError:
                added = {}
        special: dict[str, int] = {}
        for i, (content, _) in added.items():
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"added token {content!r} has id {i}, outside vocab of {self.vocab_size}")
            special[content] = i
        skip = {i for i, (_, is_special) in added.items() if is_special}
        for name in ("unk_token", "bos_token", "eos_token", "pad_token"):
            content = getattr(cfg, name)
            if content is None:
                continue
            if content not in special:
                i = self.sp.piece_to_id(content)
                if self.sp.id_to_piece(i) != content:
                    raise TokenizerError(f"{name} {content!r} is not a piece of {path}")
                special[content] = i
            skip.add(special[content])
        self.special_tokens: dict[str, int] = special
        self.bos_id: int = special[cfg.bos_token]
        self.eos_id: int = special[cfg.eos_token]
        self.pad_id: int = special[cfg.pad_token] if cfg.pad_token is not None else self.eos_id
        self.add_bos: bool = cfg.add_bos_token
        self.add_eos: bool = cfg.add_eos_token
        self.chat_template = chat_template or ChatTemplate(BUILTIN)
        self._template_vars: dict[str, object] = {    # the names transformers gives a template
            "bos_token": cfg.bos_token, "eos_token": cfg.eos_token, "unk_token": cfg.unk_token,
            "pad_token": cfg.pad_token, "additional_special_tokens": list(cfg.additional_special_tokens)}
        self._id_to_special = {i: c for c, i in special.items()}
        self._skip_ids = frozenset(skip)
        alternation = "|".join(re.escape(c) for c in sorted(special, key=len, reverse=True))
        self._split = re.compile(f"({alternation})")
        byte_ids = ((self.sp.piece_to_id(f"<0x{b:02X}>"), b) for b in range(256))
        self._byte_of: dict[int, int] = {i: b for i, b in byte_ids if self.sp.is_byte(i)}

    @classmethod
    def from_dir(cls, path: str | Path, chat_template: str = AUTO) -> Tokenizer:
        """Read <path>/tokenizer.model and, when present, <path>/tokenizer_config.json.
        `chat_template`: data.chat_template's values (auto, builtin, or a template file); the
        template is compiled here, so a bad one fails before any other work."""
        d = Path(path)
        if not d.is_dir():
            raise MissingFileError(f"tokenizer directory {d} does not exist")
        model, cfg_path = d / MODEL_FILE, d / CONFIG_FILE
        if not model.is_file():
            raise MissingFileError(f"tokenizer model {model} does not exist")
        config = None
        if cfg_path.is_file():
            try:
                raw = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{cfg_path}: not valid JSON ({e})") from None
            config = TokenizerConfig.from_json(raw, str(cfg_path))
        template = load_chat_template(chat_template, config.chat_template if config else None,
                                      str(cfg_path))
        return cls(model, config, template)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
        ids += self._pieces(text)
        if self.add_eos:
            ids.append(self.eos_id)
        return ids

    def _pieces(self, text: str) -> list[int]:
        """text -> ids, special-token strings as their ids, nothing added."""
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:  # odd parts are the special-token matches
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        run: list[int] = []
        n = self.vocab_size
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {n})")
            if i in self._id_to_special:
                if skip_special_tokens and i in self._skip_ids:
                    continue
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self._id_to_special[i])
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids of a conversation: its text (render_chat) tokenized as transformers does
        for a chat (no bos or eos added: the template writes them). Special-token strings inside
        content are tokenized as special tokens, as with the published template."""
        return self._pieces(self.render_chat(messages, add_generation_prompt))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation's text by this tokenizer's chat template (chat_template.py)."""
        if self.chat_template.is_builtin and not {IM_START, IM_END} <= self.special_tokens.keys():
            raise TokenizerError("this tokenizer has no <|im_start|>/<|im_end|> special tokens")
        return self.chat_template.render(messages, self._template_vars, add_generation_prompt)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._id_to_special.get(int(i)) or self.sp.id_to_piece(int(i))


class IncrementalDetokenizer:
    """Streams text token by token with the prefix/read-offset technique: each add() decodes only
    the short window since the last emitted boundary. A boundary is only taken where no UTF-8
    character can straddle it (no trailing byte-fallback pieces forming an incomplete sequence),
    so no half character is emitted and the concatenated output equals decode(all ids)."""

    _CONTEXT = 4  # prompt ids kept as left context (sentencepiece space handling at the start)
    _TRIM = 64

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        ctx: list[int] = []
        tail = [] if prompt_ids is None else list(prompt_ids[-4 * self._CONTEXT:])
        for i in reversed(tail):
            if len(ctx) == self._CONTEXT:
                break
            if not (self._skip and int(i) in tokenizer._skip_ids):
                ctx.insert(0, int(i))
        self._ids = ctx
        if ctx and (self._pending() or tokenizer.decode(ctx, self._skip).endswith("\ufffd")):
            self._ids = []  # an unfinished character in the prompt tail: start without context
        self._prefix = 0
        self._read = len(self._ids)
        self._chunks: list[str] = []
        self._text: str | None = ""

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = "".join(self._chunks)
        return self._text

    def _pending(self) -> bool:
        """True when the trailing byte pieces are an unfinished UTF-8 sequence (conservative)."""
        k = 0
        for tid in reversed(self._ids[-3:]):
            b = self._tok._byte_of.get(tid)
            if b is None or b < 0x80:
                return False
            k += 1
            if b >= 0xC0:  # lead byte: sequence length 2, 3 or 4
                return k < (2 if b < 0xE0 else 3 if b < 0xF0 else 4)
        return False

    def _emit(self) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > self._TRIM:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        if delta:
            self._chunks.append(delta)
            self._text = None
        return delta

    def add(self, token_id: int) -> str:
        """Feed one generated id; returns the text it finalizes (possibly '')."""
        tid = int(token_id)
        if not 0 <= tid < self._tok.vocab_size:
            raise ValueError(f"token id {tid} is outside the vocabulary [0, {self._tok.vocab_size})")
        if self._skip and tid in self._tok._skip_ids:
            return ""
        self._ids.append(tid)
        return "" if self._pending() else self._emit()

    def flush(self) -> str:
        """Text still held back (an unfinished byte sequence decodes to U+FFFD, as in decode())."""
        return self._emit() if self._read < len(self._ids) else ""
