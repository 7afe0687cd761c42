"""Input: resolve Parquet files and validate them up front (``plan_input``: schemas + id column
only, every job-level problem -> InputError before the model loads). Streaming the rows of a
plan is ``runtime.stream.iter_rows``."""
from __future__ import annotations

import fnmatch
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

INT_OVERRIDES = ("max_new_tokens", "top_k", "seed")
FLOAT_OVERRIDES = ("temperature", "top_p")
OVERRIDE_COLUMNS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
_MAX_NAMED = 5


class InputError(ValueError):
    """A job-level input problem: the job must not start."""


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


@dataclass
class InputPlan:
    files: list[Path]
    num_rows: int
    id_type: pa.DataType
    has_id_column: bool
    present_prompt_columns: list[str]
    override_columns: list[str]
    file_rows: list[int] = field(default_factory=list)  # rows per file, same order as files

    def __post_init__(self) -> None:
        for ok, what in ((self.files, "files must not be empty"), (self.num_rows >= 0, "num_rows must be >= 0"),
                         (_id_type_ok(self.id_type), f"id_type must be integer or string, not {self.id_type}"),
                         (self.present_prompt_columns, "present_prompt_columns must not be empty")):
            if not ok:
                raise ValueError(f"InputPlan.{what}")
        bad = [c for c in self.override_columns if c not in OVERRIDE_COLUMNS]
        if bad:
            raise ValueError(f"unknown override columns {bad}; known: {list(OVERRIDE_COLUMNS)}")
        if self.file_rows and (len(self.file_rows) != len(self.files) or sum(self.file_rows) != self.num_rows):
            raise ValueError("InputPlan.file_rows must have one count per file summing to num_rows")


@dataclass
class InputRow:
    id: int | str
    prompt: str | None
    messages: list[dict] | None
    token_ids: list[int] | None
    overrides: dict[str, int | float]
    error: str | None

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, (int, str)):
            raise ValueError(f"InputRow.id must be int or str, got {self.id!r}")
        if self.error is None:
            forms = sum(x is not None for x in (self.prompt, self.messages, self.token_ids))
            if forms != 1:
                raise ValueError(f"row id {self.id!r}: exactly one prompt form must be set when error is None")


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _id_type_ok(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or _is_str(t)


def resolve_input_files(spec: str) -> list[Path]:
    """A file, a directory (every ``*.parquet`` below it, skipping ``.``/``_``-prefixed names) or a glob."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"data.input must be a non-empty path, directory or glob, got {spec!r}")
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        candidates = [p]
    elif glob.has_magic(spec):
        candidates = [Path(x) for x in glob.glob(str(p), recursive=True)]
    else:
        raise InputError(f"data.input {spec!r}: no such file or directory")
    files: set[Path] = set()
    for c in candidates:
        if c.is_dir():
            files.update(f for f in c.rglob("*.parquet")
                         if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(c).parts))
        elif c.is_file():
            files.add(c)
    if not files:
        raise InputError(f"data.input {spec!r}: no Parquet files match")
    return sorted(files, key=str)


def would_read(spec: str, path: Path) -> bool:
    """Whether `resolve_input_files(spec)` would pick up a Parquet file at `path` (not yet
    there): e.g. an output shard written inside an input directory, read back on the rerun."""
    p = Path(os.path.normpath(Path(spec).expanduser().absolute()))
    parts = Path(os.path.normpath(path.absolute())).parts

    def under(d: tuple[str, ...]) -> bool:  # a directory input takes every file below it
        rest = parts[len(d):]
        return parts[:len(d)] == d and bool(rest) and not any(x.startswith((".", "_")) for x in rest)

    if p.is_dir() or not glob.has_magic(spec):
        return p.is_dir() and under(p.parts)

    def match(pat: tuple[str, ...], got: tuple[str, ...]) -> bool:  # glob's rules, part by part
        if not pat:
            return not got
        if pat[0] == "**":
            return any(match(pat[1:], got[i:]) for i in range(len(got) + 1))
        return bool(got) and not got[0].startswith(".") and \
            fnmatch.fnmatchcase(got[0], pat[0]) and match(pat[1:], got[1:])
    # the file itself, or a directory above it that the glob names
    return match(p.parts, parts) or any(match(p.parts, parts[:k]) and under(parts[:k])
                                        for k in range(1, len(parts)))


def _check_type(path: Path, col: str, t: pa.DataType, columns: InputColumns) -> None:
    if pa.types.is_null(t):
        return  # an all-null column: every row uses the job value / another form
    if col == columns.prompt:
        ok, expected = _is_str(t), "string or large_string"
    elif col == columns.messages:
        vt = t.value_type if _is_list(t) else None
        ok = (vt is not None and pa.types.is_struct(vt)
              and all(vt.get_field_index(k) >= 0 and _is_str(vt.field(k).type) for k in ("role", "content")))
        expected = "list<struct<role: string, content: string>>"
    elif col == columns.token_ids:
        ok, expected = _is_list(t) and pa.types.is_integer(t.value_type), "list<integer>"
    elif col in INT_OVERRIDES:
        ok, expected = pa.types.is_integer(t), "integer"
    else:  # float override
        ok, expected = pa.types.is_integer(t) or pa.types.is_floating(t), "float or integer"
    if not ok:
        raise InputError(f"{path}: column {col!r} has type {t}, expected {expected}")


def plan_input(spec: str, columns: InputColumns) -> InputPlan:
    """Pre-pass: read only schemas and the id column; raise InputError on any job-level problem."""
    files = resolve_input_files(spec)
    relevant = [columns.id, *columns.prompt_forms, *OVERRIDE_COLUMNS]
    ref: dict[str, pa.DataType | None] | None = None  # column -> type (None = absent) from first file
    ref_path = files[0]
    file_rows: list[int] = []
    ids: list[pa.ChunkedArray] = []
    for path in files:
        try:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
        except Exception as e:  # noqa: BLE001 - any reader failure means unreadable
            raise InputError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
        found: dict[str, pa.DataType | None] = {}
        for col in relevant:
            idx = schema.get_all_field_indices(col)
            if len(idx) > 1:
                raise InputError(f"{path}: column {col!r} appears {len(idx)} times")
            found[col] = schema.field(idx[0]).type if idx else None
        if not any(found[c] is not None for c in columns.prompt_forms):
            raise InputError(f"{path}: none of the prompt columns {list(columns.prompt_forms)} is present; "
                             f"columns found: {schema.names}")
        for col in relevant[1:]:
            if found[col] is not None:
                _check_type(path, col, found[col], columns)
        if ref is None:
            ref = found
        for col in relevant:
            a, b = ref[col], found[col]
            if (a is None) != (b is None) or (a is not None and b is not None and a != b
                                              and not pa.types.is_null(a) and not pa.types.is_null(b)):
                raise InputError(f"inconsistent schemas: column {col!r} is {a if a is not None else 'absent'} "
                                 f"in {ref_path} but {b if b is not None else 'absent'} in {path}")
            if a is not None and pa.types.is_null(a):
                ref[col] = b  # adopt the concrete type once one file has it
        if found[columns.id] is not None:
            if not _id_type_ok(found[columns.id]):
                raise InputError(f"{path}: id column {columns.id!r} has unsupported type {found[columns.id]}; "
                                 "expected an integer or string type")
            try:
                col_ids = pf.read(columns=[columns.id]).column(0)
                if _is_str(col_ids.type):
                    col_ids.validate(full=True)
            except Exception as e:  # noqa: BLE001
                raise InputError(f"{path}: cannot read id column {columns.id!r} ({type(e).__name__}: {e})") from e
            if col_ids.null_count:
                first = pc.index(pc.is_null(col_ids), True).as_py()
                raise InputError(f"{path}: id column {columns.id!r} has {col_ids.null_count} null value(s); "
                                 f"first at row {first} of that file")
            ids.append(col_ids)
        file_rows.append(pf.metadata.num_rows)
    assert ref is not None
    has_id = ref[columns.id] is not None
    if ids:
        counts = pc.value_counts(pa.chunked_array([c for ch in ids for c in ch.chunks], ids[0].type))
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        if len(dup):
            named = ", ".join(repr(v) for v in dup.field("values")[:_MAX_NAMED].to_pylist())
            more = f" (and {len(dup) - _MAX_NAMED} more)" if len(dup) > _MAX_NAMED else ""
            raise InputError(f"duplicate ids in column {columns.id!r}: {named}{more}")
    return InputPlan(
        files=files,
        num_rows=sum(file_rows),
        id_type=ref[columns.id] if has_id else pa.int64(),
        has_id_column=has_id,
        present_prompt_columns=[c for c in columns.prompt_forms if ref[c] is not None],
        override_columns=[c for c in OVERRIDE_COLUMNS if ref[c] is not None],
        file_rows=file_rows,
    )
