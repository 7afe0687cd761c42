"""Input: the files of ``data.input`` (``runtime.data.sources``: any filesystem, Parquet or JSON Lines,
hive folders) validated up front by ``plan_input``: schemas, ids and carried columns; every
job-level problem -> InputError before the model loads. Streaming the rows of a plan is
``runtime.data.stream.iter_rows``."""
from __future__ import annotations

from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from internlm2_tp.engine.params import (BOOLEAN, INTEGER, INTEGER_LIST, NUMBER, RULES, STRING,
                                        STRING_LIST)
from internlm2_tp.errors import InputError
from internlm2_tp.runtime.data import jsonl
from internlm2_tp.runtime.data.input_types import (OVERRIDE_COLUMNS, FileFacts, InputColumns, InputFile,
                                              InputPlan, id_type_ok, is_list, is_str)
from internlm2_tp.runtime.data.output import OUTPUT_COLUMNS
from internlm2_tp.runtime.data.sources import resolve_input_files

_MAX_NAMED = 5
# The Parquet column type that holds each kind of sampling value (engine/params.py), and its name.
_ARROW_KINDS: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    INTEGER.name: (pa.types.is_integer, "integer"),
    NUMBER.name: (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t), "float or integer"),
    BOOLEAN.name: (pa.types.is_boolean, "boolean"),
    STRING.name: (is_str, "string"),
    INTEGER_LIST.name: (lambda t: is_list(t) and pa.types.is_integer(t.value_type), "list<integer>"),
    STRING_LIST.name: (lambda t: is_list(t) and is_str(t.value_type), "list<string>"),
}


def _check_type(name: str, col: str, t: pa.DataType, columns: InputColumns) -> None:
    if pa.types.is_null(t):
        return  # an all-null column: every row uses the job value / another form
    if col == columns.prompt:
        ok, expected = is_str(t), "string or large_string"
    elif col == columns.messages:
        vt = t.value_type if is_list(t) else None
        ok = (vt is not None and pa.types.is_struct(vt)
              and all(vt.get_field_index(k) >= 0 and is_str(vt.field(k).type) for k in ("role", "content")))
        expected = "list<struct<role: string, content: string>>"
    elif col == columns.token_ids:
        ok, expected = is_list(t) and pa.types.is_integer(t.value_type), "list<integer>"
    else:  # a sampling override
        check, expected = _ARROW_KINDS[RULES[col].kind.name]
        ok = check(t)
    if not ok:
        raise InputError(f"{name}: column {col!r} has type {t}, expected {expected}")


def _parquet_facts(fs: pafs.FileSystem, f: InputFile, columns: InputColumns) -> FileFacts:
    """Schema, row count and ids of one Parquet file (footer and id column only)."""
    try:
        with fs.open_input_file(f.path) as src:
            pf = pq.ParquetFile(src)
            schema = pf.schema_arrow
            facts = FileFacts(rows=pf.metadata.num_rows)
            for col in schema.names:
                idx = schema.get_all_field_indices(col)
                if len(idx) > 1 and col in columns.relevant:
                    raise InputError(f"{f}: column {col!r} appears {len(idx)} times")
                if len(idx) == 1:   # an ambiguous other column cannot be carried: left out
                    facts.fields[col] = schema.field(idx[0]).type
            t = facts.fields.get(columns.id)
            if t is not None and not id_type_ok(t):
                raise InputError(f"{f}: id column {columns.id!r} has unsupported type {t}; "
                                 "expected an integer or string type")
            for col in columns.relevant[1:]:
                if col in facts.fields:
                    _check_type(f.name, col, facts.fields[col], columns)
            if t is not None:
                try:
                    facts.ids = pf.read(columns=[columns.id]).column(0)
                    if is_str(facts.ids.type):
                        facts.ids.validate(full=True)
                except Exception as e:  # noqa: BLE001
                    raise InputError(f"{f}: cannot read id column {columns.id!r} ({type(e).__name__}: {e})") from e
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means unreadable
        raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    if facts.ids is not None and facts.ids.null_count:
        first = pc.index(pc.is_null(facts.ids), True).as_py()
        raise InputError(f"{f}: id column {columns.id!r} has {facts.ids.null_count} null value(s); "
                         f"first at row {first} of that file")
    return facts


def _consistent(col: str, ref: dict, ref_file: InputFile, t: pa.DataType | None, f: InputFile) -> None:
    a = ref.get(col)
    if (a is None) != (t is None) or (a is not None and t is not None and a != t
                                      and not pa.types.is_null(a) and not pa.types.is_null(t)):
        raise InputError(f"inconsistent schemas: column {col!r} is {a if a is not None else 'absent'} "
                         f"in {ref_file} but {t if t is not None else 'absent'} in {f}")
    if a is None or pa.types.is_null(a):
        ref[col] = t  # adopt the concrete type once one file has it


def _carry_schema(carry: list[str] | None, files: list[InputFile], facts: list[FileFacts],
                  columns: InputColumns) -> pa.Schema:
    """The carried columns (``carry`` None: every column but the prompt forms and the id), each
    present in every file, with one type (JSON: widened across files; Parquet: equal)."""
    if carry is None:
        names = list(dict.fromkeys(c for x in facts for c in x.fields
                                   if c != columns.id and c not in columns.prompt_forms))
    else:
        names = carry
    clash = [n for n in names if n in OUTPUT_COLUMNS]
    if clash:
        how = "list the columns to carry instead of '*'" if carry is None else "rename it in the input"
        raise InputError(f"data.carry_columns: input column {clash[0]!r} clashes with an output column "
                         f"{list(OUTPUT_COLUMNS)}; {how}")
    types: dict[str, pa.DataType] = {}
    for f, x in zip(files, facts):
        missing = [n for n in names if n not in x.fields]
        if missing:
            raise InputError(f"{f}: carried column {missing[0]!r} (data.carry_columns) is missing; "
                             f"columns found: {list(x.fields)}")
        for n in names:
            if n not in types:
                types[n] = x.fields[n]
            elif f.format == "json":
                types[n] = jsonl.unify(types[n], x.fields[n], f"column {n!r} of {f}")
            else:
                _consistent(n, types, files[0], x.fields[n], f)
    return pa.schema([pa.field(n, types[n]) for n in names])


def plan_input(spec: str, columns: InputColumns, carry: Sequence[str] = (), fmt: str = "auto") -> InputPlan:
    """Pre-pass: Parquet schemas and id columns (JSON Lines: every line, parsed); raise
    InputError on any job-level problem. ``carry``: input columns to copy to the output
    (``["*"]``: all but the prompt forms)."""
    loc, files = resolve_input_files(spec, fmt)
    want = None if list(carry) == ["*"] else list(carry)
    ref: dict[str, pa.DataType | None] = {}
    facts: list[FileFacts] = []
    for f in files:
        x = _parquet_facts(loc.fs, f, columns) if f.format == "parquet" else jsonl.scan(loc.fs, f, columns, want)
        for k, _ in f.partitions:
            if k in columns.relevant or k in x.fields:
                raise InputError(f"{f}: hive partition folder {k}=... names column {k!r}, which the "
                                 "file or the job already uses; rename the folder")
            x.fields[k] = pa.string()
        if (x.rows or f.format == "parquet") and not any(c in x.fields for c in columns.prompt_forms):
            raise InputError(f"{f}: none of the prompt columns {list(columns.prompt_forms)} is present; "
                             f"columns found: {list(x.fields)}")
        for col in (columns.relevant if f.format == "parquet" else [columns.id]):
            if f is files[0]:
                ref[col] = x.fields.get(col)
            _consistent(col, ref, files[0], x.fields.get(col), f)
        facts.append(x)
    has_id = ref[columns.id] is not None
    ids = [x.ids for x in facts if x.ids is not None]
    if ids:
        chunks = [c for a in ids for c in (a.chunks if isinstance(a, pa.ChunkedArray) else [a])]
        counts = pc.value_counts(pa.chunked_array(chunks, ids[0].type))
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        if len(dup):
            named = ", ".join(repr(v) for v in dup.field("values")[:_MAX_NAMED].to_pylist())
            more = f" (and {len(dup) - _MAX_NAMED} more)" if len(dup) > _MAX_NAMED else ""
            raise InputError(f"duplicate ids in column {columns.id!r}: {named}{more}")
    seen = lambda c: any(c in x.fields for x in facts)  # noqa: E731
    return InputPlan(
        files=files, num_rows=sum(x.rows for x in facts),
        id_type=ref[columns.id] if has_id else pa.int64(), has_id_column=has_id,
        present_prompt_columns=[c for c in columns.prompt_forms if seen(c)],
        override_columns=[c for c in OVERRIDE_COLUMNS if seen(c)],
        file_rows=[x.rows for x in facts], fs=loc.fs,
        carry_schema=_carry_schema(want, files, facts, columns))
