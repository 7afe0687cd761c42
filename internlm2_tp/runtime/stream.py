"""Stream the rows of a planned input (``io.plan_input``) in bounded batches, in file order,
skipping ids already written. Row-level problems (no or two prompt forms, nulls, bad UTF-8,
out-of-range per-row overrides) come back as ``InputRow.error`` naming the row and column, so
the job writes an error row and goes on."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from internlm2_tp.runtime.io import FLOAT_OVERRIDES, InputColumns, InputError, InputPlan, InputRow

_OVERRIDE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "must be finite and >= 0"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 disables top-k)"),
    "seed": (lambda v: v >= 0, "must be >= 0"),
}


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


def _make_row(rid: int | str, forms: dict[str, Any], bad_utf8: list[str],
              overrides: dict[str, Any], columns: InputColumns) -> InputRow:
    errs = [f"column {c!r} is not valid UTF-8" for c in bad_utf8]
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
        messages = [{"role": m["role"], "content": m["content"]} for m in messages if m is not None]
    if token_ids is not None:
        if not token_ids:
            errs.append(f"column {columns.token_ids!r} is an empty list")
        elif any(t is None or t < 0 for t in token_ids):
            errs.append(f"column {columns.token_ids!r} contains null or negative token ids")
    clean: dict[str, int | float] = {}
    for name, v in overrides.items():
        if v is not None:
            v = float(v) if name in FLOAT_OVERRIDES else int(v)
            check, rule = _OVERRIDE_RULES[name]
            if check(v):
                clean[name] = v
            else:
                errs.append(f"column {name!r}: {v} {rule}")
    if errs:
        return InputRow(rid, None, None, None, {}, f"row id {rid!r}: " + "; ".join(errs))
    return InputRow(rid, prompt, messages, token_ids, clean, None)


def _batches(path: Path, cols: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Stream record batches of one file; reader failures become InputError naming the file."""
    try:
        it = pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=cols)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"{path}: cannot open for reading ({type(e).__name__}: {e})") from e
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{path}: failed while reading ({type(e).__name__}: {e})") from e
        yield batch


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
    cols = ([columns.id] if plan.has_id_column else []) + plan.present_prompt_columns + plan.override_columns
    pending: list[InputRow] = []
    offset = 0
    for path in plan.files:
        for batch in _batches(path, cols, batch_rows):
            n = batch.num_rows
            ids = batch.column(columns.id) if plan.has_id_column else pa.array(range(offset, offset + n), pa.int64())
            offset += n
            if skip is not None:
                keep = pc.invert(pc.is_in(ids, value_set=skip))
                batch, ids = batch.filter(keep), ids.filter(keep)
            if not batch.num_rows:
                continue
            id_list = ids.to_pylist()
            data = {c: _pylist(batch.column(c)) for c in plan.present_prompt_columns}
            ovr = {c: batch.column(c).to_pylist() for c in plan.override_columns}
            for i, rid in enumerate(id_list):
                forms = {c: data[c][0][i] for c in plan.present_prompt_columns}
                bad = [c for c in plan.present_prompt_columns if i in data[c][1]]
                pending.append(_make_row(rid, forms, bad, {c: v[i] for c, v in ovr.items()}, columns))
            while len(pending) >= batch_rows:
                yield pending[:batch_rows]
                pending = pending[batch_rows:]
    if pending:
        yield pending
