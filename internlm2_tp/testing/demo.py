"""The embedded default: a tiny random-weight InternLM2 checkpoint and a small demo Parquet."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint

PROMPTS = [
    "The capital of France is",
    "Write a haiku about tensor parallelism.",
    "请用一句话介绍上海。",
    "机器学习和深度学习有什么区别？",
    "Explain KV caches to a five-year-old 🙂",
    "def fibonacci(n):",
]
CHATS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is InternLM2?"}],
    [{"role": "user", "content": "你好！请介绍一下你自己。"}],
]


def prepare_demo(root: str | Path) -> tuple[Path, Path, Path]:
    """(checkpoint dir, input Parquet, fresh output dir) under root."""
    root = Path(root)
    ckpt = root / "tiny-internlm2"
    if not (ckpt / "model.safetensors.index.json").is_file():
        write_tiny_checkpoint(ckpt, TinySpec())
    data = root / "prompts.parquet"
    msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    n = len(PROMPTS) + len(CHATS)
    table = pa.table({
        "id": pa.array(range(n), pa.int64()),
        "prompt": pa.array(PROMPTS + [None] * len(CHATS), pa.string()),
        "messages": pa.array([None] * len(PROMPTS) + CHATS, msg_type),
    })
    pq.write_table(table, data)
    out = root / "output"
    shutil.rmtree(out, ignore_errors=True)
    return ckpt, data, out
