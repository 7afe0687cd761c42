"""Stream the rows of a planned input (``io.plan_input``) in bounded batches, in file order,
skipping ids already written, from Parquet (row groups) or JSON Lines (lines), each row with its
carried columns (a one-row record batch of the plan's carry schema). Row-level problems (no or
two prompt forms, nulls, bad UTF-8, out-of-range per-row overrides, a bad JSON line) come back as
``InputRow.error`` naming the row and column (and file:line for JSON), so the job writes an error
row and goes on."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from internlm2_tp.engine.params import row_value
from internlm2_tp.errors import InputError
from internlm2_tp.runtime.data import jsonl
from internlm2_tp.runtime.data.input_types import InputColumns, InputFile, InputPlan, InputRow
def _pylist(arr: pa.Array) -> tuple[list[Any], set[int]]:
    """to_pylist, tolerating invalid UTF-8: bad elements become None and their index is reported."""
    try:
        return arr.to_pylist(), set()
    except UnicodeDecodeError:
        out: list[Any] = []
        bad: set[int] = set()
        for i in range(len(arr)):
            try:
                out.append(arr[i].as_py())
            except UnicodeDecodeError:
                out.append(None)
                bad.add(i)
        return out, bad


def _make_row(rid: int | str, forms: dict[str, Any], bad_utf8: list[str], overrides: dict[str, Any],
              columns: InputColumns, errs: list[str] | None = None, where: str = "") -> InputRow:
    """The row, or an error row naming it (``where``: a JSON line's ``file:line: ``)."""
    errs = [*(errs or []), *(f"column {c!r} is not valid UTF-8" for c in bad_utf8)]
    set_cols = [c for c, v in forms.items() if v is not None]
    if not errs and not set_cols:
        errs.append(f"none of the prompt columns {list(columns.prompt_forms)} is set")
    elif len(set_cols) > 1:
        errs.append(f"more than one prompt form is set (columns {set_cols}); give exactly one")
    prompt, messages, token_ids = (forms.get(c) for c in columns.prompt_forms)
    if prompt is not None and prompt == "":
        errs.append(f"column {columns.prompt!r} is an empty string")
    if messages is not None:
        if not messages:
            errs.append(f"column {columns.messages!r} is an empty list")
        for i, m in enumerate(messages):
            if m is None:
                errs.append(f"column {columns.messages!r}: message {i} is null")
            elif not m.get("role"):
                errs.append(f"column {columns.messages!r}: message {i} has a null or empty role")
            elif m.get("content") is None:
                errs.append(f"column {columns.messages!r}: message {i} has null content")
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages if m is not None]
    if token_ids is not None:
        if not token_ids:
            errs.append(f"column {columns.token_ids!r} is an empty list")
        elif any(t is None or t < 0 for t in token_ids):
            errs.append(f"column {columns.token_ids!r} contains null or negative token ids")
    clean: dict[str, Any] = {}
    for name, v in overrides.items():
        if v is not None:
            v, err = row_value(name, v)
            if err:
                errs.append(f"column {name!r}: {v} {err}")
            else:
                clean[name] = v
    if errs:
        return InputRow(rid, None, None, None, {}, f"row id {rid!r}: {where}" + "; ".join(errs))
    return InputRow(rid, prompt, messages, token_ids, clean, None)


Chunk = tuple[int, "pa.Array | None", Callable[[list[int], list], list[InputRow]]]


def _batches(plan: InputPlan, f: InputFile, cols: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream record batches of one file; reader failures become InputError naming the file."""
    try:
        src = plan.fs.open_input_file(f.path)
        it = pq.ParquetFile(src).iter_batches(batch_size=batch_rows, columns=cols)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{f}: cannot open for reading ({type(e).__name__}: {e})") from e
    with src:
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as e:
                raise InputError(f"{f}: failed while reading ({type(e).__name__}: {e})") from e
            yield batch


def _carried(plan: InputPlan, f: InputFile, n: int, value: Callable[[str], pa.Array]) -> pa.RecordBatch | None:
    """The carried columns of n rows: hive folders as constants, the rest from ``value(name)``."""
    if not len(plan.carry_schema):
        return None
    parts = dict(f.partitions)
    arrays = [pa.array([parts[fl.name]] * n, fl.type) if fl.name in parts else value(fl.name)
              for fl in plan.carry_schema]
    return pa.RecordBatch.from_arrays(arrays, schema=plan.carry_schema)


def _with_carry(rows: list[InputRow], carry: pa.RecordBatch | None) -> list[InputRow]:
    if carry is not None:
        for i, r in enumerate(rows):
            r.carry = carry.slice(i, 1)
    return rows


def _parquet_chunks(plan: InputPlan, f: InputFile, columns: InputColumns, batch_rows: int) -> Iterator[Chunk]:
    parts = dict(f.partitions)
    carried = [n for n in plan.carry_schema.names if n not in parts]
    forms, ovr_cols = plan.present_prompt_columns, plan.override_columns
    cols = list(dict.fromkeys(([columns.id] if plan.has_id_column else []) + forms + ovr_cols + carried))
    for batch in _batches(plan, f, cols, batch_rows):
        def build(idx: list[int], ids: list, batch: pa.RecordBatch = batch) -> list[InputRow]:
            sub = batch if len(idx) == batch.num_rows else batch.take(pa.array(idx, pa.int64()))
            data = {c: _pylist(sub.column(c)) for c in forms}
            ovr = {c: sub.column(c).to_pylist() for c in ovr_cols}
            rows = [_make_row(rid, {c: data[c][0][i] for c in forms}, [c for c in forms if i in data[c][1]],
                              {c: v[i] for c, v in ovr.items()}, columns) for i, rid in enumerate(ids)]
            return _with_carry(rows, _carried(plan, f, len(ids), lambda n: sub.column(n).cast(
                plan.carry_schema.field(n).type)))
        yield batch.num_rows, batch.column(columns.id) if plan.has_id_column else None, build


def _json_chunks(plan: InputPlan, f: InputFile, columns: InputColumns, batch_rows: int) -> Iterator[Chunk]:
    for lines in jsonl.batches(plan.fs, f, batch_rows):
        ids = (pa.array([jsonl.line_id(x, columns.id)[1] for x in lines], plan.id_type)
               if plan.has_id_column else None)

        def build(idx: list[int], ids: list, lines: list[jsonl.Line] = lines) -> list[InputRow]:
            sel, rows = [lines[i] for i in idx], []
            for line, rid in zip(sel, ids):
                where = f"{f}:{line.no}: "
                if line.obj is None:
                    rows.append(InputRow(rid, None, None, None, {}, f"row id {rid!r}: {where}{line.error}"))
                    continue
                forms, ovr, errs = jsonl.row_values(line.obj, columns)
                rows.append(_make_row(rid, forms, [], ovr, columns, errs, where))

            def value(n: str) -> pa.Array:
                try:
                    return pa.array([x.obj.get(n) if x.obj else None for x in sel], plan.carry_schema.field(n).type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                    raise InputError(f"{f}: carried column {n!r}: {e}") from e
            return _with_carry(rows, _carried(plan, f, len(sel), value))
        yield len(lines), ids, build


def iter_rows(plan: InputPlan, columns: InputColumns, batch_rows: int,
              skip_ids: pa.Array | None = None) -> Iterator[list[InputRow]]:
    """Yield lists of ``batch_rows`` rows (the last may be shorter), in file order, skipping done ids."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    skip: pa.Array | None = None
    if skip_ids is not None and len(skip_ids):
        if isinstance(skip_ids, pa.ChunkedArray):
            skip_ids = skip_ids.combine_chunks()
        try:
            skip = skip_ids.cast(plan.id_type) if skip_ids.type != plan.id_type else skip_ids
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(f"done ids have type {skip_ids.type}, incompatible with input id type {plan.id_type}") from e
    pending: list[InputRow] = []
    offset = 0
    for f in plan.files:
        chunks = (_parquet_chunks if f.format == "parquet" else _json_chunks)(plan, f, columns, batch_rows)
        for n, ids, build in chunks:
            if ids is None:   # no id column: the row number over all files
                ids = pa.array(range(offset, offset + n), pa.int64())
            offset += n
            idx = list(range(n))
            if skip is not None:
                idx = [i for i, done in enumerate(pc.is_in(ids, value_set=skip).to_pylist()) if not done]
            if idx:
                pending.extend(build(idx, ids.take(pa.array(idx, pa.int64())).to_pylist()))
            while len(pending) >= batch_rows:
                yield pending[:batch_rows]
                pending = pending[batch_rows:]
    if pending:
        yield pending
