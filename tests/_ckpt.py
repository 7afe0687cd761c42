"""Helpers for tests that damage checkpoints: clones of symlinks (cheap, and the layout of a
Hugging Face cache snapshot) with the files to damage copied."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


def clone(src: Path, dst: Path, copy: tuple[str, ...] = ()) -> Path:
    """A checkpoint of symlinks to `src` (the layout of a Hugging Face cache snapshot), with
    config.json, the index and the files in `copy` as real copies, free to damage."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name in ("config.json", INDEX, *copy):
            shutil.copy(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def rewrite_shard(path: Path, fn: Callable[[dict], None]) -> None:
    from safetensors.torch import load_file, save_file
    sd = load_file(path)
    fn(sd)
    save_file(sd, str(path))
