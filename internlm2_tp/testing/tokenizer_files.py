"""Tokenizer files for tests and demos: find the real InternLM2 sentencepiece model (it is not
committed: $INTERNLM2_TOKENIZER, else ../shared/data/ beside the checkout), train a small stand-in
when it is absent, and write a checkpoint-style tokenizer directory (tokenizer.model +
tokenizer_config.json).

The stand-in keeps the properties that matter to the engine: byte fallback, no dummy-prefix
space, identity normalisation, ids 0/1/2 = <unk>/<s>/</s>, and the six chat special tokens as
single pieces named like the real model's placeholders ([UNUSED_TOKEN_141]..[UNUSED_TOKEN_146]),
so that a reader must take their names from tokenizer_config.json exactly as it must for a
published checkpoint.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import sentencepiece as spm

from internlm2_tp.errors import MissingFileError
from internlm2_tp.tokenizer import load_sentencepiece
from internlm2_tp.tokenizer_config import (CONFIG_FILE, MODEL_FILE, SPECIAL_TOKEN_PIECES,
                                           special_token_ids)

TOKENIZER_ENV = "INTERNLM2_TOKENIZER"
# The published internlm2-chat tokenizer_config.json's chat_template (tests/test_chat_template.py
# cites it and checks that it renders as the built-in template).
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + "
                 "'\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if "
                 "add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def find_default_tokenizer_model() -> Path | None:
    """The real InternLM2 tokenizer model: $INTERNLM2_TOKENIZER if set (it must then exist), else
    <repo_root>/../shared/data/tokenizer_internlm2.model; None when that file is absent."""
    env = os.environ.get(TOKENIZER_ENV, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise MissingFileError(f"${TOKENIZER_ENV}={env!r} is not a file")
        return path
    repo_root = Path(__file__).resolve().parents[2]
    path = repo_root.parent / "shared" / "data" / "tokenizer_internlm2.model"
    return path if path.is_file() else None


def _corpus(seed: int = 20240117) -> list[str]:
    """A small deterministic mixed corpus: English prose, Chinese, code, digits and emoji."""
    rng = random.Random(seed)
    words = ("the of and to in is that for it with as was on be by this model token batch "
             "inference tensor parallel layer attention head weight value key query output input "
             "hello world python return import class def self result number people time year "
             "good first new great little small large long system user assistant answer question").split()
    zh = ("你好 世界 模型 推理 张量 并行 中文 测试 今天 天气 很好 我们 学习 数据 生成 文本 问题 回答 "
          "的 是 在 了 和 有 一个 这个 不 人 中国 北京 上海 时间 可以 因为 所以 如果 就").split()
    emoji = ("😀", "🚀", "👍", "🎉", "🔥", "🙂", "✨", "🌍")
    code = (
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n    print(i * 2)\n",
        "import torch\nx = torch.zeros(3, 4)\ny = x.sum(dim=-1)\n",
        "class Node:\n    def __init__(self, value):\n        self.value = value\n",
        "if key not in cache:\n\tcache[key] = compute(key)\n",
        "const total = items.map((x) => x.price).reduce((a, b) => a + b, 0);\n",
        "{\"name\": \"internlm2\", \"layers\": 32, \"heads\": [8, 32]}\n",
    )
    out: list[str] = []
    for i in range(4000):
        kind = i % 5
        if kind == 0:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))).capitalize() + ".")
        elif kind == 1:
            out.append("".join(rng.choice(zh) for _ in range(rng.randint(3, 12))) + rng.choice("。，！？"))
        elif kind == 2:
            out.append(rng.choice(code))
        elif kind == 3:
            out.append(f"{rng.choice(words)} {rng.choice(emoji)} {rng.choice(zh)} {rng.randint(0, 99999)}")
        else:
            out.append(f"{rng.choice(zh)}{rng.choice(words)} ({rng.choice(words)}): {rng.choice(zh)}\n")
    return out


def train_fallback_model(out_path: str | Path, vocab_size: int = 1000) -> dict[int, str]:
    """Train a small deterministic BPE sentencepiece model at out_path and return {id: content}
    for the six chat special tokens (reserved as user-defined pieces, so each is one id).

    vocab_size is an upper bound (the built-in corpus may not support much more than ~2000)."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 300 <= vocab_size <= 8000:
        raise ValueError(f"vocab_size must be an int in [300, 8000], got {vocab_size!r}")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=[p for p, _ in SPECIAL_TOKEN_PIECES], character_coverage=0.9995,
        split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        shuffle_input_sentence=False, num_threads=1, minloglevel=2,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return special_token_ids(spm.SentencePieceProcessor(model_proto=buf.getvalue()))


def tokenizer_config(special: dict[int, str], model_max_length: int = 32768) -> dict[str, Any]:
    """A tokenizer_config.json in the published InternLM2 layout (auto_map left out on purpose)."""
    def entry(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    decoder = {"0": entry("<unk>"), "1": entry("<s>"), "2": entry("</s>")}
    decoder.update({str(i): entry(c) for i, c in sorted(special.items())})
    return {
        "added_tokens_decoder": decoder,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": model_max_length,
        "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }


def write_tokenizer_files(out_dir: str | Path, model_path: str | Path | None = None) -> int:
    """Write out_dir/tokenizer.model (a copy of model_path, else of the real model when found, else
    a freshly trained fallback) and out_dir/tokenizer_config.json. Returns the vocab size."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(model_path) if model_path is not None else find_default_tokenizer_model()
    if src is not None and not src.is_file():
        raise MissingFileError(f"tokenizer model {src} does not exist")
    dst = out / MODEL_FILE
    if src is not None:
        shutil.copyfile(src, dst)
        sp = load_sentencepiece(dst)
        special = special_token_ids(sp)
    else:
        special = train_fallback_model(dst)
        sp = load_sentencepiece(dst)
    config = tokenizer_config(special)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return sp.get_piece_size()
