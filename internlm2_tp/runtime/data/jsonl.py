"""JSON Lines input: one object per line, read line by line in bounded memory from any
filesystem (``.gz``, ``.bz2``, ``.zst`` decompressed by extension).

JSON has no schema, so a line stands alone: a line that is not valid JSON, or whose prompt or
override has the wrong JSON type, is a bad row (an error row naming the file and line), not a
dead job. The id must still be known to report such a row exactly once: when the input has ids,
a malformed line's id is read from its text (``"id": 7``) and a line whose id cannot be read is
refused up front, naming the line. Carried columns get one Arrow type per column, inferred from
every line (ints and floats widen to double, objects merge their keys; other mixes are refused).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from internlm2_tp.engine.params import RULES
from internlm2_tp.errors import InputError
from internlm2_tp.runtime.data.input_types import OVERRIDE_COLUMNS, FileFacts, InputColumns, InputFile
from internlm2_tp.runtime.data.storage import STORE_ERRORS

_CHUNK = 1 << 20
_INFER_EVERY = 8192
_INT64 = (-2**63, 2**63 - 1)


@dataclass
class Line:
    no: int                      # 1-based line number in the file
    raw: bytes
    obj: dict | None             # the parsed object, or None when the line is bad
    error: str | None = None     # why it is bad


def json_type(v: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def lines(fs: pafs.FileSystem, f: InputFile) -> Iterator[Line]:
    """Every non-blank line of a file, parsed; read failures are job-level (InputError)."""
    try:
        stream = fs.open_input_stream(f.path, compression="detect")
    except STORE_ERRORS as e:
        raise InputError(f"{f}: cannot open for reading ({type(e).__name__}: {e})") from None
    with stream:
        rest, no = b"", 0
        while True:
            try:
                buf = stream.read(_CHUNK)
            except STORE_ERRORS as e:
                raise InputError(f"{f}: failed while reading ({type(e).__name__}: {e})") from None
            if not buf:
                break
            *whole, rest = (rest + buf).split(b"\n")
            for raw in whole:
                no += 1
                if no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if raw.strip():
                    yield _parse(no, raw)
        if rest.strip():
            yield _parse(no + 1, rest[3:] if no == 0 and rest.startswith(b"\xef\xbb\xbf") else rest)


def _parse(no: int, raw: bytes) -> Line:
    try:
        obj = json.loads(raw)
    except ValueError as e:   # JSONDecodeError and UnicodeDecodeError
        return Line(no, raw, None, f"not valid JSON ({e})")
    if not isinstance(obj, dict):
        return Line(no, raw, None, f"not a JSON object (got {json_type(obj)})")
    return Line(no, raw, obj)


def line_id(line: Line, id_col: str) -> tuple[bool, Any]:
    """(whether the line gives an id, the id): from the object, or read from a bad line's text."""
    if line.obj is not None:
        return id_col in line.obj, line.obj.get(id_col)
    key = re.escape(json.dumps(id_col).encode())
    m = re.search(key + rb'\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")', line.raw)
    if m:
        try:
            return True, json.loads(m.group(1))
        except ValueError:
            pass
    return False, None


def check_id(v: Any, f: InputFile, no: int, col: str) -> type:
    if v is None:
        raise InputError(f"{f}: line {no}: id column {col!r} is null")
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise InputError(f"{f}: line {no}: id column {col!r} has unsupported type {json_type(v)}; "
                         "expected an integer or string type")
    if isinstance(v, int) and not _INT64[0] <= v <= _INT64[1]:
        raise InputError(f"{f}: line {no}: id {v} does not fit a 64-bit integer")
    return type(v)


def unify(a: pa.DataType | None, b: pa.DataType, where: str) -> pa.DataType:
    if a is None or a == b:
        return b
    try:
        return pa.unify_schemas([pa.schema([("x", a)]), pa.schema([("x", b)])],
                                promote_options="permissive").field("x").type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        raise InputError(f"{where} has values of types {a} and {b}; a carried column needs one "
                         "type") from None


def scan(fs: pafs.FileSystem, f: InputFile, columns: InputColumns, carry: list[str] | None) -> FileFacts:
    """The pre-pass over one file: rows, ids (checked), keys seen, carried columns' types
    (``carry`` None: every key but the prompt forms and the id)."""
    facts, ids, kind, first_id = FileFacts(), [], None, 0
    missing_id, unreadable, objects = 0, 0, 0
    pending: dict[str, list] = {}
    skip = {columns.id, *columns.prompt_forms}

    def infer() -> None:
        for k, vals in pending.items():
            try:
                t = pa.array(vals).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                raise InputError(f"{f}: column {k!r} cannot be carried, its values have different "
                                 f"types ({e})") from None
            facts.fields[k] = unify(facts.fields.get(k), t, f"{f}: column {k!r}")
        pending.clear()

    for line in lines(fs, f):
        facts.rows += 1
        has, v = line_id(line, columns.id)
        if line.obj is not None:
            objects += 1
            for k, val in line.obj.items():
                facts.fields.setdefault(k, pa.null())
                if (k in carry) if carry is not None else (k not in skip):
                    pending.setdefault(k, []).append(val)
            missing_id = missing_id or (0 if has else line.no)
            first_id = first_id or (line.no if has else 0)
        elif not has:
            unreadable = unreadable or line.no
        if has:
            t = check_id(v, f, line.no, columns.id)
            if kind is not None and t is not kind:
                raise InputError(f"{f}: line {line.no}: id {v!r} is {json_type(v)} but earlier ids "
                                 f"are {'integers' if kind is int else 'strings'}")
            kind = t
            ids.append(v)
        if facts.rows % _INFER_EVERY == 0:
            infer()
    infer()
    if facts.rows and not objects:
        raise InputError(f"{f}: no line is a JSON object; JSON Lines has one object per line (a JSON "
                         "array converts with `jq -c '.[]'`)")
    if first_id:
        if missing_id:
            raise InputError(f"{f}: line {missing_id} has no id column {columns.id!r} (line {first_id} "
                             "has one); give every line an id, or none")
        if unreadable:
            raise InputError(f"{f}: line {unreadable} is not valid JSON and its {columns.id!r} cannot be "
                             "read, so its row could not be reported; fix or remove the line")
        facts.ids = pa.array(ids, pa.int64() if kind is int else pa.string())
        facts.fields[columns.id] = facts.ids.type
    return facts


def batches(fs: pafs.FileSystem, f: InputFile, batch_rows: int) -> Iterator[list[Line]]:
    out: list[Line] = []
    for line in lines(fs, f):
        out.append(line)
        if len(out) == batch_rows:
            yield out
            out = []
    if out:
        yield out


_FORMS = {  # column kind -> (check, expected)
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "messages": (lambda v: isinstance(v, list) and all(
        m is None or (isinstance(m, dict) and all(isinstance(m.get(k), (str, type(None)))
                                                  for k in ("role", "content"))) for m in v),
        "an array of {role, content} objects with string values"),
    "token_ids": (lambda v: isinstance(v, list) and all(
        x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in v), "an array of integers"),
}


def row_values(obj: dict, columns: InputColumns) -> tuple[dict, dict, list[str]]:
    """(prompt forms, overrides, errors) of one line, JSON types checked per value."""
    errs: list[str] = []
    forms: dict[str, Any] = {}
    for kind, col in zip(("prompt", "messages", "token_ids"), columns.prompt_forms):
        v = obj.get(col)
        check, expected = _FORMS[kind]
        if v is not None and not check(v):
            errs.append(f"column {col!r} is {json_type(v)}, expected {expected}")
            v = None
        forms[col] = v
    overrides: dict[str, Any] = {}
    for col in OVERRIDE_COLUMNS:
        v = obj.get(col)
        if v is None:
            continue
        kind = RULES[col].kind
        if kind.json_accepts(v):
            overrides[col] = v
        else:
            shown = repr(v) if isinstance(v, (int, float)) else json_type(v)
            errs.append(f"column {col!r} is {shown}, expected {kind.name}")
    return forms, overrides, errs
