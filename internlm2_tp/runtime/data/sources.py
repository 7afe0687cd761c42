"""Where the input is: the files of ``data.input`` on any filesystem (a local path or URI: one
file, a directory of shards such as a Spark or Ray Data output folder, a glob), their formats
(Parquet or JSON Lines, by extension or ``data.format``) and their hive ``key=value`` folders."""
from __future__ import annotations

import os
from urllib.parse import unquote

import pyarrow.fs as pafs

from internlm2_tp.errors import InputError, StorageError
from internlm2_tp.runtime.data import storage
from internlm2_tp.runtime.data.input_types import InputFile, InputPlan
from internlm2_tp.runtime.data.storage import Location

EXTENSIONS = {"parquet": (".parquet", ".parq"), "json": (".jsonl", ".json", ".ndjson")}
_COMPRESSED = (".gz", ".bz2", ".zst")
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def format_of(name: str) -> str | None:
    """The format a file name says (``x.jsonl.gz``: json), or None."""
    n = name.lower()
    for fmt, exts in EXTENSIONS.items():
        if n.endswith(exts) or (fmt == "json" and n.endswith(tuple(e + c for e in exts for c in _COMPRESSED))):
            return fmt
    return None


def _partitions(name: str, rel_dirs: list[str]) -> tuple[tuple[str, str | None], ...]:
    out: dict[str, str | None] = {}
    for part in rel_dirs:
        k, eq, v = part.partition("=")
        if eq and k:
            if k in out:
                raise InputError(f"{name}: hive partition key {k!r} appears twice in its path")
            out[k] = None if v == _HIVE_NULL else unquote(v)
    return tuple(out.items())


def resolve_input_files(spec: str, fmt: str = "auto") -> tuple[Location, list[InputFile]]:
    """A file; a directory (every data file below it, skipping ``.``/``_``-prefixed names such
    as ``_SUCCESS``); or a glob (``**`` spans folders). A directory takes the files whose
    extension fits ``fmt`` (auto: Parquet and JSON Lines); so does a glob unless ``fmt`` is set."""
    exts = (fmt,) if fmt != "auto" else tuple(EXTENSIONS)
    try:
        loc = storage.resolve(spec, "data.input")
        if not loc.is_local:
            storage.check_reachable(loc, "data.input")
        magic = storage.has_magic(loc.path)
        if magic:
            root, entries = storage.glob(loc, "data.input")
        else:
            t = storage.info(loc, "data.input").type
            if t == pafs.FileType.NotFound:
                raise InputError(f"data.input {spec!r}: no such file or directory")
            root, entries = loc.path, [(loc.path, t == pafs.FileType.Directory)]
        found: dict[str, str] = {}   # path -> its path below the root (hive folders)
        for path, is_dir in entries:
            if not is_dir:
                if not (magic and fmt == "auto" and format_of(path) is None):
                    found[path] = path[len(root):]
                continue
            for e in storage.listdir(Location(loc.fs, path, loc.prefix), "data.input", recursive=True):
                rel = e.path[len(path):].strip("/").split("/")
                if e.type == pafs.FileType.File and not storage.hidden(rel) and format_of(rel[-1]) in exts:
                    found[e.path] = e.path[len(root):]
    except StorageError as e:
        raise InputError(str(e)) from None
    if not found:
        raise InputError(f"data.input {spec!r}: no input files match (Parquet: {EXTENSIONS['parquet']}, "
                         f"JSON Lines: {EXTENSIONS['json']}, optionally {_COMPRESSED})")
    files = []
    for path in sorted(found):
        f = fmt if fmt != "auto" else format_of(path)
        if f is None:
            raise InputError(f"data.input {loc.show(path)}: cannot tell the format from the name; set "
                             "data.format=parquet or data.format=json")
        dirs = found[path].strip("/").split("/")[:-1]
        files.append(InputFile(path, loc.show(path), f, _partitions(loc.show(path), dirs)))
    kinds = sorted({f.format for f in files})
    if len(kinds) > 1:
        eg = [next(f.name for f in files if f.format == k) for k in kinds]
        raise InputError(f"data.input {spec!r} holds both Parquet and JSON Lines files (e.g. {eg}); "
                         "set data.format or narrow the input")
    return loc, files


def would_read(spec: str, shard: Location) -> bool:
    """Whether `resolve_input_files(spec)` would pick up a file at `shard` (not yet there): e.g.
    an output shard written inside an input directory, read back on the rerun."""
    loc = storage.resolve(spec, "data.input")
    if type(loc.fs) is not type(shard.fs) or not loc.fs.equals(shard.fs):
        return False
    parts = shard.path.strip("/").split("/")

    def under(d: list[str]) -> bool:  # a directory input takes every file below it
        rest = parts[len(d):]
        return parts[:len(d)] == d and bool(rest) and not storage.hidden(rest)

    if not storage.has_magic(loc.path):
        d = loc.path.strip("/").split("/")
        return storage.info(loc, "data.input").type == pafs.FileType.Directory and under(d)
    pat = loc.path.strip("/").split("/")
    # the file itself, or a directory above it that the glob names
    return storage.glob_match(pat, parts) or any(storage.glob_match(pat, parts[:k]) and under(parts[:k])
                                                 for k in range(1, len(parts)))


def inputs_inside(plan: InputPlan, out: Location) -> list[InputFile]:
    """The input files that lie in the output directory (symlinks resolved on a filesystem)."""
    if type(plan.fs) is not type(out.fs) or not plan.fs.equals(out.fs):
        return []
    norm = os.path.realpath if out.is_local else (lambda p: p.rstrip("/"))
    root = norm(out.path)
    return [f for f in plan.files if (p := norm(f.path)) == root or p.startswith(root.rstrip("/") + "/")]


