"""Output rows and shards: the output schema (our columns, then the carried input columns),
``OutputRow``, and ``ShardWriter``, whose Parquet shards appear whole under their final name on a
filesystem or an object store alike. The directory itself (layout, resume, fingerprint,
manifest) is ``runtime.data.output_dir``."""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from internlm2_tp.errors import OutputDirError
from internlm2_tp.runtime.data import storage
from internlm2_tp.runtime.data.output_dir import _PART, _RUN_ID, _W, as_location
from internlm2_tp.runtime.data.storage import Location

FINISH_REASONS = ("stop", "length", "error")
_INT32_MAX = 2**31 - 1


def _column(arrow: pa.DataType, nullable: bool = False, default: Any = None,
            optional: bool = False) -> Any:
    """A field of OutputRow that is an output column of this Parquet type. `optional`: present
    only in the outputs of jobs that ask for it (`optional_columns`)."""
    meta = {"arrow": arrow, "nullable": nullable, "optional": optional}
    return field(metadata=meta) if not optional else field(default=default, metadata=meta)


TOP_LOGPROB = pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])


@dataclass
class OutputRow:
    """One output row. Its fields are the output's columns, in order, each with its Parquet type:
    the one definition the schema, the shard writer and the carried-column clash check derive
    from. A new column is one field here."""
    id: int | str                     # typed as the input's ids
    completion: str = _column(pa.string())
    completion_token_ids: list[int] = _column(pa.list_(pa.int32()))
    prompt_tokens: int = _column(pa.int32())
    completion_tokens: int = _column(pa.int32())
    finish_reason: str = _column(pa.string())
    error: str | None = _column(pa.string(), nullable=True)
    # The optional columns, after today's (null: the row did not ask, or it is an error row).
    sample_index: int = _column(pa.int32(), default=0, optional=True)
    token_logprobs: list[float] | None = _column(pa.list_(pa.float32()), True, optional=True)
    top_logprobs: list[list[dict]] | None = _column(pa.list_(pa.list_(TOP_LOGPROB)), True,
                                                    optional=True)
    prompt_token_logprobs: list[float | None] | None = _column(pa.list_(pa.float32()), True,
                                                               optional=True)
    reward: float | None = _column(pa.float32(), True, optional=True)   # a reward model's score

    def __post_init__(self) -> None:
        _check_row(self)


# The output columns after the id: (name, type, nullable), and every column's name.
FIELDS: tuple[tuple[str, pa.DataType, bool], ...] = tuple(
    (f.name, f.metadata["arrow"], f.metadata["nullable"]) for f in fields(OutputRow) if f.metadata)
OUTPUT_COLUMNS = tuple(f.name for f in fields(OutputRow))
OPTIONAL_COLUMNS = tuple(f.name for f in fields(OutputRow) if f.metadata.get("optional"))


def optional_columns(n: int, logprobs: int, prompt_logprobs: bool,
                     override_columns: list[str] | tuple[str, ...] = (),
                     reward: bool = False) -> tuple[str, ...]:
    """The optional columns a job's output has: fixed for the whole job by its settings, its
    input's override columns (a row's `n` or `logprobs` column may ask for them) and its task
    (`reward`: a reward model's job), so every shard of one output has the same schema."""
    want = {"sample_index": n > 1 or "n" in override_columns,
            "token_logprobs": logprobs >= 0 or "logprobs" in override_columns,
            "top_logprobs": logprobs > 0 or "logprobs" in override_columns,
            "prompt_token_logprobs": prompt_logprobs, "reward": reward}
    return tuple(c for c in OPTIONAL_COLUMNS if want[c])


def output_schema(id_type: pa.DataType, carry: pa.Schema | None = None,
                  optional: tuple[str, ...] = ()) -> pa.Schema:
    """Our columns (the optional ones listed in `optional`), then the carried input columns
    (``data.carry_columns``) as they came."""
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise ValueError(f"output id type must be an integer or string type, got {id_type}")
    carry = carry if carry is not None else pa.schema([])
    clash = [n for n in carry.names if n in OUTPUT_COLUMNS]
    if clash or len(set(carry.names)) != len(carry.names):
        raise ValueError(f"carried columns {carry.names} repeat a name or clash with {list(OUTPUT_COLUMNS)}")
    return pa.schema([pa.field("id", id_type, nullable=False),
                      *(pa.field(n, t, nullable=nl) for n, t, nl in FIELDS
                        if n not in OPTIONAL_COLUMNS or n in optional), *carry])


def _check_row(row: OutputRow) -> None:
    """Each value fits its column and the row is consistent (an error row has its message)."""
    who = f"OutputRow id {row.id!r}"
    if isinstance(row.id, bool) or not isinstance(row.id, (int, str)):
        raise ValueError(f"{who}: id must be int or str")
    if not isinstance(row.completion, str):
        raise ValueError(f"{who}: completion must be a str, got {type(row.completion).__name__}")
    ids = row.completion_token_ids
    if not isinstance(ids, list) or not all(type(t) is int and 0 <= t <= _INT32_MAX for t in ids):
        raise ValueError(f"{who}: completion_token_ids must be a list of ints in [0, 2**31)")
    for name in ("prompt_tokens", "completion_tokens"):
        v = getattr(row, name)
        if type(v) is not int or not 0 <= v <= _INT32_MAX:
            raise ValueError(f"{who}: {name} must be an int in [0, 2**31), got {v!r}")
    if row.completion_tokens != len(ids):
        raise ValueError(f"{who}: completion_tokens={row.completion_tokens} but "
                         f"{len(ids)} completion_token_ids")
    if row.finish_reason not in FINISH_REASONS:
        raise ValueError(f"{who}: finish_reason must be one of {FINISH_REASONS}, got {row.finish_reason!r}")
    if row.finish_reason == "error" and not (isinstance(row.error, str) and row.error):
        raise ValueError(f"{who}: finish_reason 'error' needs a non-empty error message")
    if row.finish_reason != "error" and row.error is not None:
        raise ValueError(f"{who}: error must be None unless finish_reason is 'error'")
    if type(row.sample_index) is not int or not 0 <= row.sample_index <= _INT32_MAX:
        raise ValueError(f"{who}: sample_index must be an int in [0, 2**31)")
    for name in ("token_logprobs", "top_logprobs"):
        v = getattr(row, name)
        if v is not None and len(v) != len(ids):
            raise ValueError(f"{who}: {name} has {len(v)} entries for {len(ids)} tokens")
    if row.reward is not None and (type(row.reward) is not float or row.finish_reason == "error"):
        raise ValueError(f"{who}: reward must be a float (None on an error row)")
    p = row.prompt_token_logprobs
    if p is not None and (len(p) != row.prompt_tokens or (p and p[0] is not None)):
        raise ValueError(f"{who}: prompt_token_logprobs must have one entry per prompt token, "
                         "the first null")


class ShardWriter:
    """Buffers OutputRows (and their carried columns) and writes them as
    ``part-<run-id>-<seq>.parquet`` shards that appear whole."""

    def __init__(self, out: Location | str | os.PathLike, id_type: pa.DataType, shard_rows: int = 1000,
                 run_id: str | None = None, carry: pa.Schema | None = None,
                 optional: tuple[str, ...] = ()):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        if run_id is None:
            run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(4)
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run_id must match {_RUN_ID.pattern}, got {run_id!r}")
        self.out = as_location(out)
        if self.out.has_dirs and storage.info(self.out, _W).type != pafs.FileType.Directory:
            raise OutputDirError(f"output directory {self.out.uri} does not exist (call prepare_output_dir)")
        self.schema = output_schema(id_type, carry, optional)
        self.carry = carry if carry is not None else pa.schema([])
        self._id_is_int = pa.types.is_integer(id_type)
        self.shard_rows = shard_rows
        self.run_id = run_id
        seqs = [int(m.group(2)) for e in storage.listdir(self.out, _W)
                if (m := _PART.match(e.base_name)) and m.group(1) == run_id]
        self._seq = max(seqs, default=-1) + 1  # never overwrite a shard of a reused run id
        self._buf: list[tuple[OutputRow, pa.RecordBatch | None]] = []
        self._closed = False
        self.rows_written = 0
        self.files: list[str] = []   # names of the shards written, in order

    def add(self, row: OutputRow, carry: pa.RecordBatch | None = None) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not isinstance(row, OutputRow):
            raise TypeError(f"expected OutputRow, got {type(row).__name__}")
        if isinstance(row.id, int) != self._id_is_int:
            raise ValueError(f"row id {row.id!r} does not match output id type {self.schema.field('id').type}")
        if len(self.carry) and (carry is None or carry.num_rows != 1 or not carry.schema.equals(self.carry)):
            raise ValueError(f"row id {row.id!r}: carried columns must be one row of {self.carry}")
        if not len(self.carry) and carry is not None and carry.num_columns:
            raise ValueError(f"row id {row.id!r}: carried columns given but the output carries none")
        self._buf.append((row, carry))
        if len(self._buf) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        rows = [r for r, _ in self._buf]
        arrays = [pa.array([getattr(r, f.name) for r in rows], f.type)
                  for f in self.schema if f.name in OUTPUT_COLUMNS]
        if len(self.carry):
            arrays += pa.concat_batches([c for _, c in self._buf]).columns
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_arrays(arrays, schema=self.schema), sink)
        name = f"part-{self.run_id}-{self._seq:05d}.parquet"
        storage.write_atomic(self.out.child(name), sink.getvalue(), _W)
        self._seq += 1
        self.rows_written += len(rows)
        self.files.append(name)
        self._buf = []

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # buffered rows are complete results: keep them even when unwinding
