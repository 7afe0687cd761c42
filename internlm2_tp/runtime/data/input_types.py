"""The input side's vocabulary: column names, the plan of an input (files, formats, id type,
carried columns) and one input row. Shared by io (planning), jsonl and stream (reading)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from internlm2_tp.engine.params import ROW_OVERRIDES

OVERRIDE_COLUMNS = ROW_OVERRIDES   # a row's own sampling values (engine/params.py), named as the field
FORMATS = ("parquet", "json")


@dataclass(frozen=True)
class InputColumns:
    id: str = "id"
    prompt: str = "prompt"
    messages: str = "messages"
    token_ids: str = "prompt_token_ids"

    def __post_init__(self) -> None:
        names = [self.id, self.prompt, self.messages, self.token_ids]
        for n in names:
            if not isinstance(n, str) or not n:
                raise ValueError(f"input column names must be non-empty strings, got {n!r}")
        if len(set(names)) != 4:
            raise ValueError(f"input column names must be distinct, got {names}")
        clash = [n for n in names if n in OVERRIDE_COLUMNS]
        if clash:
            raise ValueError(f"input column names {clash} clash with override columns {list(OVERRIDE_COLUMNS)}")

    @property
    def prompt_forms(self) -> tuple[str, str, str]:
        return (self.prompt, self.messages, self.token_ids)

    @property
    def relevant(self) -> list[str]:
        """Every column the job itself reads: the id, the prompt forms, the overrides."""
        return [self.id, *self.prompt_forms, *OVERRIDE_COLUMNS]


@dataclass(frozen=True)
class InputFile:
    path: str                     # the filesystem's path (local path, or bucket/key)
    name: str                     # as shown to the user: the local path or the URI
    format: str                   # parquet | json
    partitions: tuple[tuple[str, str | None], ...] = ()   # hive key=value folders above it

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"InputFile.format must be one of {FORMATS}, got {self.format!r}")

    def __str__(self) -> str:
        return self.name


@dataclass
class InputPlan:
    files: list[InputFile]
    num_rows: int
    id_type: pa.DataType
    has_id_column: bool
    present_prompt_columns: list[str]
    override_columns: list[str]
    file_rows: list[int] = field(default_factory=list)  # rows per file, same order as files
    fs: pafs.FileSystem = field(default_factory=pafs.LocalFileSystem)
    carry_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))

    def __post_init__(self) -> None:
        for ok, what in ((self.files, "files must not be empty"), (self.num_rows >= 0, "num_rows must be >= 0"),
                         (id_type_ok(self.id_type), f"id_type must be integer or string, not {self.id_type}"),
                         (self.present_prompt_columns, "present_prompt_columns must not be empty")):
            if not ok:
                raise ValueError(f"InputPlan.{what}")
        bad = [c for c in self.override_columns if c not in OVERRIDE_COLUMNS]
        if bad:
            raise ValueError(f"unknown override columns {bad}; known: {list(OVERRIDE_COLUMNS)}")
        if self.file_rows and (len(self.file_rows) != len(self.files) or sum(self.file_rows) != self.num_rows):
            raise ValueError("InputPlan.file_rows must have one count per file summing to num_rows")


@dataclass
class FileFacts:
    """What the pre-pass learnt of one input file."""
    rows: int = 0
    ids: pa.Array | pa.ChunkedArray | None = None              # its ids, when it has an id column
    fields: dict[str, pa.DataType] = field(default_factory=dict)  # its columns (JSON: keys seen)


@dataclass
class InputRow:
    id: int | str
    prompt: str | None
    messages: list[dict] | None
    token_ids: list[int] | None
    overrides: dict[str, Any]              # the row's own sampling values (engine/params.py)
    error: str | None
    carry: pa.RecordBatch | None = None   # the row's carried columns (one row), if any

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, (int, str)):
            raise ValueError(f"InputRow.id must be int or str, got {self.id!r}")
        if self.error is None:
            forms = sum(x is not None for x in (self.prompt, self.messages, self.token_ids))
            if forms != 1:
                raise ValueError(f"row id {self.id!r}: exactly one prompt form must be set when error is None")
        if self.carry is not None and self.carry.num_rows != 1:
            raise ValueError(f"row id {self.id!r}: carry must hold exactly one row")


def is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def id_type_ok(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or is_str(t)
