"""Parquet inputs for tests/test_io.py (planning) and tests/test_stream.py (streaming)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from internlm2_tp.runtime.data.input_types import InputColumns, InputRow
from internlm2_tp.runtime.data.io import plan_input
from internlm2_tp.runtime.data.stream import iter_rows

COLS = InputColumns()
MSG_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def write(path: Path, data: dict, schema: pa.Schema | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data, schema=schema), path, **kw)
    return path


def all_rows(spec: str, cols: InputColumns = COLS, batch_rows: int = 3, skip=None, carry=(),
             fmt: str = "auto") -> list[InputRow]:
    plan = plan_input(spec, cols, carry, fmt)
    return [r for batch in iter_rows(plan, cols, batch_rows, skip) for r in batch]


def write_lines(path: Path, *lines: str | dict, compress: str = "") -> Path:
    """A JSON Lines file: dicts are dumped, strings written as they are (bad lines)."""
    import gzip
    import json
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join((json.dumps(x, ensure_ascii=False) if isinstance(x, dict) else x) + "\n"
                   for x in lines).encode()
    path.write_bytes(gzip.compress(data) if compress == "gz" else data)
    return path
