"""Output side: atomic Parquet shards, resume from existing shards, job fingerprint, manifest.

Layout of ``data.output``::

    job.json                              fingerprint of the job that owns the directory
    part-<run-id>-<seq:05d>.parquet       completed shards (appear atomically via os.replace)
    .<final-name>.<hex>.tmp               in-flight temp files (removed at the next start)
    _manifest.json                        written last, when the job finished
"""
from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

JOB_FILE = "job.json"
MANIFEST_FILE = "_manifest.json"
FINISH_REASONS = ("stop", "length", "error")
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PART = re.compile(r"^part-([A-Za-z0-9_-]{1,64})-(\d{5,})\.parquet$")
_TEMP = re.compile(r"^\.(part-[A-Za-z0-9_-]{1,64}-\d{5,}\.parquet|job\.json|_manifest\.json)\.[0-9a-f]+\.tmp$")
_INT32_MAX = 2**31 - 1


class OutputDirError(ValueError):
    """The output directory cannot be used as asked (foreign files, other job, corrupt shards)."""


def _id_type_ok(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def output_schema(id_type: pa.DataType) -> pa.Schema:
    if not _id_type_ok(id_type):
        raise ValueError(f"output id type must be an integer or string type, got {id_type}")
    return pa.schema([
        pa.field("id", id_type, nullable=False),
        pa.field("completion", pa.string(), nullable=False),
        pa.field("completion_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("completion_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=True),
    ])


@dataclass
class OutputRow:
    id: int | str
    completion: str
    completion_token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error: str | None

    def __post_init__(self) -> None:
        who = f"OutputRow id {self.id!r}"
        if isinstance(self.id, bool) or not isinstance(self.id, (int, str)):
            raise ValueError(f"{who}: id must be int or str")
        if not isinstance(self.completion, str):
            raise ValueError(f"{who}: completion must be a str, got {type(self.completion).__name__}")
        ids = self.completion_token_ids
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t <= _INT32_MAX for t in ids):
            raise ValueError(f"{who}: completion_token_ids must be a list of ints in [0, 2**31)")
        for name in ("prompt_tokens", "completion_tokens"):
            v = getattr(self, name)
            if type(v) is not int or not 0 <= v <= _INT32_MAX:
                raise ValueError(f"{who}: {name} must be an int in [0, 2**31), got {v!r}")
        if self.completion_tokens != len(ids):
            raise ValueError(f"{who}: completion_tokens={self.completion_tokens} but "
                             f"{len(ids)} completion_token_ids")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"{who}: finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if self.finish_reason == "error" and not (isinstance(self.error, str) and self.error):
            raise ValueError(f"{who}: finish_reason 'error' needs a non-empty error message")
        if self.finish_reason != "error" and self.error is not None:
            raise ValueError(f"{who}: error must be None unless finish_reason is 'error'")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(final: Path, write: Any) -> None:
    """Write via ``write(fileobj)`` to a hidden temp file next to ``final``, fsync, rename, fsync dir."""
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def _write_json(final: Path, obj: dict) -> None:
    try:
        data = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"{final.name}: content is not JSON-serialisable: {e}") from e
    _atomic_write(final, lambda f: f.write(data))


class ShardWriter:
    """Buffers OutputRows and writes them as atomic ``part-<run-id>-<seq>.parquet`` shards."""

    def __init__(self, out_dir: Path, id_type: pa.DataType, shard_rows: int = 1000, run_id: str | None = None):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        if run_id is None:
            run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run_id must match {_RUN_ID.pattern}, got {run_id!r}")
        self.out_dir = Path(out_dir)
        if not self.out_dir.is_dir():
            raise OutputDirError(f"output directory {self.out_dir} does not exist (call prepare_output_dir)")
        self.schema = output_schema(id_type)
        self._id_is_int = pa.types.is_integer(id_type)
        self.shard_rows = shard_rows
        self.run_id = run_id
        seqs = [int(m.group(2)) for p in self.out_dir.iterdir()
                if (m := _PART.match(p.name)) and m.group(1) == run_id]
        self._seq = max(seqs, default=-1) + 1  # never overwrite a shard of a reused run id
        self._buf: list[OutputRow] = []
        self._closed = False
        self.rows_written = 0
        self.files: list[Path] = []

    def add(self, row: OutputRow) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not isinstance(row, OutputRow):
            raise TypeError(f"expected OutputRow, got {type(row).__name__}")
        if isinstance(row.id, int) != self._id_is_int:
            raise ValueError(f"row id {row.id!r} does not match output id type {self.schema.field('id').type}")
        self._buf.append(row)
        if len(self._buf) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        rows = self._buf
        table = pa.Table.from_arrays(
            [pa.array([getattr(r, f.name) for r in rows], f.type) for f in self.schema], schema=self.schema)
        final = self.out_dir / f"part-{self.run_id}-{self._seq:05d}.parquet"
        _atomic_write(final, lambda f: pq.write_table(table, f))
        self._seq += 1
        self.rows_written += len(rows)
        self.files.append(final)
        self._buf = []

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # buffered rows are complete results: keep them even when unwinding


def fingerprint_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (nested) fingerprint dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "<root>"]
    out: list[str] = []
    for k in sorted(set(old) | set(new), key=str):
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in old or k not in new:
            out.append(key)
        else:
            out.extend(fingerprint_diff(old[k], new[k], key))
    return out


def _scan(out_dir: Path) -> tuple[list[Path], list[Path], list[str]]:
    """(part files sorted, our temp files, foreign names)."""
    parts, temps, foreign = [], [], []
    for p in out_dir.iterdir():
        if _PART.match(p.name) and p.is_file():
            parts.append(p)
        elif _TEMP.match(p.name) and p.is_file():
            temps.append(p)
        elif not (p.name in (JOB_FILE, MANIFEST_FILE) and p.is_file()):
            foreign.append(p.name)
    return sorted(parts), temps, sorted(foreign)


def read_output_ids(out_dir: Path) -> pa.Array | None:
    """Ids already written (id column of every part file), or None when there are none."""
    if not Path(out_dir).is_dir():
        return None
    parts, _, _ = _scan(Path(out_dir))
    chunks: list[pa.Array] = []
    for p in parts:
        try:
            col = pq.read_table(p, columns=["id"]).column(0).combine_chunks()
        except Exception as e:  # noqa: BLE001
            raise OutputDirError(f"{p}: cannot read the id column of this part file ({e}); delete it to redo "
                                 "its rows") from e
        if chunks and col.type != chunks[0].type:
            raise OutputDirError(f"{p}: id type {col.type} differs from {chunks[0].type} in {parts[0]}")
        chunks.append(col)
    if not chunks:
        return None
    ids = pa.concat_arrays(chunks)
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(dup):
        holders = [str(p) for p, c in zip(parts, chunks) if pc.any(pc.is_in(c, value_set=dup)).as_py()]
        raise OutputDirError(f"ids {dup[:5].to_pylist()} appear more than once across part files {holders}")
    return ids


def prepare_output_dir(out_dir: Path, fingerprint: dict, overwrite: bool) -> pa.Array | None:
    """Create/validate the output directory for this job; return the ids already done (or None)."""
    out_dir = Path(out_dir)
    if not isinstance(fingerprint, dict):
        raise TypeError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    try:
        want = json.loads(json.dumps(fingerprint, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"fingerprint is not JSON-serialisable: {e}") from e
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output path {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts, temps, foreign = _scan(out_dir)
    if foreign:
        raise OutputDirError(f"output directory {out_dir} contains files that this job did not write: "
                             f"{foreign[:5]}{' ...' if len(foreign) > 5 else ''}; use an empty or dedicated "
                             "directory (foreign files are never deleted, even with overwrite)")
    for t in temps:
        t.unlink(missing_ok=True)
    job, manifest = out_dir / JOB_FILE, out_dir / MANIFEST_FILE
    problem = None
    if job.exists():
        try:
            have = json.loads(job.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            have, problem = None, f"{job} is unreadable ({e})"
        if problem is None and (diff := fingerprint_diff(have, want)):
            problem = f"{out_dir} holds output of a different job; fingerprint keys differ: {diff}"
    elif parts or manifest.exists():
        problem = f"{out_dir} holds output without {JOB_FILE}, so it cannot be matched to this job"
    if problem:
        if not overwrite:
            raise OutputDirError(problem + "; set overwrite to discard it, or choose another output directory")
        for p in [*parts, manifest, job]:
            p.unlink(missing_ok=True)
        _fsync_dir(out_dir)
    manifest.unlink(missing_ok=True)  # present only after a finished run; this run will rewrite it
    if not job.exists():
        _write_json(job, {"format": "internlm2_tp.output/1", "fingerprint": want,
                          "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return read_output_ids(out_dir)


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Atomically write ``_manifest.json`` (call last, after every shard is closed)."""
    if not isinstance(manifest, dict):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    _write_json(Path(out_dir) / MANIFEST_FILE, manifest)
