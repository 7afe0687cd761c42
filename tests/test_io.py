from __future__ import annotations

import gc
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from internlm2_tp.runtime.io import (
    InputColumns,
    InputError,
    InputPlan,
    InputRow,
    iter_rows,
    plan_input,
    resolve_input_files,
)

COLS = InputColumns()
MSG_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def write(path: Path, data: dict, schema: pa.Schema | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(data, schema=schema), path, **kw)
    return path


def all_rows(spec: str, cols: InputColumns = COLS, batch_rows: int = 3, skip=None) -> list[InputRow]:
    plan = plan_input(spec, cols)
    return [r for batch in iter_rows(plan, cols, batch_rows, skip) for r in batch]


# ---------------------------------------------------------------- resolving inputs
def test_single_file_directory_and_glob(tmp_path: Path) -> None:
    a = write(tmp_path / "d" / "b.parquet", {"prompt": ["x"]})
    b = write(tmp_path / "d" / "sub" / "a.parquet", {"prompt": ["y"]})
    write(tmp_path / "d" / ".hidden.parquet", {"prompt": ["z"]})
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    assert resolve_input_files(str(a)) == [a]
    assert resolve_input_files(str(tmp_path / "d")) == sorted([a, b], key=str)
    assert resolve_input_files(str(tmp_path / "d" / "**" / "*.parquet")) == sorted([a, b], key=str)
    assert resolve_input_files(str(tmp_path / "d" / "b*.parquet")) == [a]


@pytest.mark.parametrize("spec", ["missing.parquet", "nomatch-*.parquet", "emptydir"])
def test_no_files_match(tmp_path: Path, spec: str) -> None:
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="no such file|no Parquet files match"):
        plan_input(str(tmp_path / spec), COLS)


# ---------------------------------------------------------------- job-level errors
def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    good = write(tmp_path / "good.parquet", {"prompt": ["x"] * 100})
    trunc = tmp_path / "trunc.parquet"
    trunc.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(InputError, match="trunc.parquet.*not a readable Parquet"):
        plan_input(str(trunc), COLS)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match="junk.parquet"):
        plan_input(str(junk), COLS)


def test_no_prompt_column_lists_found_and_expected(tmp_path: Path) -> None:
    f = write(tmp_path / "a.parquet", {"id": [1], "text": ["x"]})
    with pytest.raises(InputError) as ei:
        plan_input(str(f), COLS)
    msg = str(ei.value)
    assert "a.parquet" in msg and "'text'" in msg and "'prompt'" in msg and "'messages'" in msg
    assert "'prompt_token_ids'" in msg


@pytest.mark.parametrize("col,arr,expected", [
    ("prompt", pa.array([1, 2]), "string"),
    ("prompt", pa.array([b"\xff\xfe", b"ok"], pa.binary()), "string"),
    ("messages", pa.array([["a"], ["b"]]), "list<struct<role"),
    ("messages", pa.array([[{"role": "u", "text": "x"}]] * 2), "list<struct<role"),
    ("prompt_token_ids", pa.array([[1.0], [2.0]]), "list<integer>"),
    ("prompt_token_ids", pa.array(["1 2", "3"]), "list<integer>"),
    ("temperature", pa.array(["hot", "cold"]), "float"),
    ("max_new_tokens", pa.array([1.5, 2.0]), "integer"),
    ("seed", pa.array([1.0, 2.0]), "integer"),
])
def test_wrong_column_types(tmp_path: Path, col: str, arr: pa.Array, expected: str) -> None:
    data = {"id": pa.array([1, 2]), col: arr}
    if col not in ("prompt", "messages", "prompt_token_ids"):
        data["prompt"] = pa.array(["a", "b"])
    f = write(tmp_path / "bad.parquet", data)
    with pytest.raises(InputError) as ei:
        plan_input(str(f), COLS)
    msg = str(ei.value)
    assert "bad.parquet" in msg and repr(col) in msg and expected in msg
    assert str(arr.type).replace("<item:", "<element:") in msg  # actual type as read back from Parquet


def test_inconsistent_schemas(tmp_path: Path) -> None:
    write(tmp_path / "a.parquet", {"id": pa.array([1], pa.int64()), "prompt": ["x"]})
    write(tmp_path / "b.parquet", {"id": pa.array([2], pa.int32()), "prompt": ["y"]})
    with pytest.raises(InputError, match=r"inconsistent schemas: column 'id' is int64 in .*a\.parquet but int32 in .*b\.parquet"):
        plan_input(str(tmp_path), COLS)
    (tmp_path / "b.parquet").unlink()
    write(tmp_path / "b.parquet", {"id": pa.array([2]), "messages": pa.array([[{"role": "u", "content": "c"}]], MSG_TYPE)})
    with pytest.raises(InputError, match="inconsistent schemas: column 'prompt'"):
        plan_input(str(tmp_path), COLS)


def test_all_null_column_is_compatible(tmp_path: Path) -> None:
    write(tmp_path / "a.parquet", {"id": [1], "prompt": ["x"], "messages": pa.array([None], pa.null())})
    write(tmp_path / "b.parquet", {"id": [2], "prompt": [None],
                                   "messages": pa.array([[{"role": "user", "content": "hi"}]], MSG_TYPE)})
    rows = all_rows(str(tmp_path))
    assert [r.error for r in rows] == [None, None]
    assert rows[1].messages == [{"role": "user", "content": "hi"}]


def test_null_ids(tmp_path: Path) -> None:
    f = write(tmp_path / "a.parquet", {"id": pa.array([1, None, 3]), "prompt": ["a", "b", "c"]})
    with pytest.raises(InputError, match=r"a\.parquet: id column 'id' has 1 null value\(s\); first at row 1"):
        plan_input(str(f), COLS)


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    write(tmp_path / "a.parquet", {"id": ["x", "y", "z"], "prompt": ["1", "2", "3"]})
    write(tmp_path / "b.parquet", {"id": ["w", "y", "x"], "prompt": ["1", "2", "3"]})
    with pytest.raises(InputError, match="duplicate ids") as ei:
        plan_input(str(tmp_path), COLS)
    assert "'x'" in str(ei.value) and "'y'" in str(ei.value) and "'w'" not in str(ei.value)


@pytest.mark.parametrize("arr", [pa.array([1.0, 2.0]), pa.array([b"a", b"b"], pa.binary()),
                                 pa.array([None, None], pa.null())])
def test_unsupported_id_type(tmp_path: Path, arr: pa.Array) -> None:
    f = write(tmp_path / "a.parquet", {"id": arr, "prompt": ["a", "b"]})
    with pytest.raises(InputError, match=f"id column 'id' has unsupported type {arr.type}"):
        plan_input(str(f), COLS)


def test_custom_column_names(tmp_path: Path) -> None:
    cols = InputColumns(id="uid", prompt="text", messages="chat", token_ids="toks")
    f = write(tmp_path / "a.parquet", {"uid": ["a", "b"], "text": ["hi", None], "toks": [None, [1, 2]]})
    plan = plan_input(str(f), cols)
    assert plan.present_prompt_columns == ["text", "toks"] and plan.id_type == pa.string()
    rows = all_rows(str(f), cols)
    assert [(r.id, r.prompt, r.token_ids, r.error) for r in rows] == [("a", "hi", None, None), ("b", None, [1, 2], None)]
    with pytest.raises(ValueError, match="distinct"):
        InputColumns(id="x", prompt="x")
    with pytest.raises(ValueError, match="clash"):
        InputColumns(id="seed")


# ---------------------------------------------------------------- ids and streaming
def test_row_number_ids_across_files(tmp_path: Path) -> None:
    write(tmp_path / "b.parquet", {"prompt": ["b0", "b1"]})
    write(tmp_path / "a.parquet", {"prompt": ["a0", "a1", "a2"]})
    plan = plan_input(str(tmp_path), COLS)
    assert not plan.has_id_column and plan.id_type == pa.int64() and plan.num_rows == 5
    assert plan.file_rows == [3, 2]
    rows = all_rows(str(tmp_path), batch_rows=2)
    assert [(r.id, r.prompt) for r in rows] == [(0, "a0"), (1, "a1"), (2, "a2"), (3, "b0"), (4, "b1")]
    # stable across reruns, and skip_ids refers to the same numbering
    rows = all_rows(str(tmp_path), batch_rows=2, skip=pa.array([0, 3], pa.int64()))
    assert [(r.id, r.prompt) for r in rows] == [(1, "a1"), (2, "a2"), (4, "b1")]


def test_batches_are_full_and_skip_ids_filtered(tmp_path: Path) -> None:
    n = 1000
    f = write(tmp_path / "a.parquet", {"id": pa.array(range(n), pa.int32()), "prompt": [f"p{i}" for i in range(n)]},
              row_group_size=64)
    plan = plan_input(str(f), COLS)
    skip = pa.array(range(0, n, 3), pa.int64())  # other int width than the input: cast
    batches = list(iter_rows(plan, COLS, 100, skip))
    got = [r.id for b in batches for r in b]
    assert got == [i for i in range(n) if i % 3]
    assert all(len(b) == 100 for b in batches[:-1]) and 0 < len(batches[-1]) <= 100
    with pytest.raises(InputError, match="incompatible"):
        list(iter_rows(plan, COLS, 100, pa.array(["x"])))
    with pytest.raises(ValueError):
        list(iter_rows(plan, COLS, 0))


def test_streaming_memory_is_bounded(tmp_path: Path) -> None:
    n, chunk = 200_000, 10_000
    path = tmp_path / "big.parquet"
    pad = "x" * 500  # ~100 MB of prompt text in total: materialising it would blow the budget
    schema = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("temperature", pa.float64())])
    with pq.ParquetWriter(path, schema) as w:
        for s in range(0, n, chunk):
            w.write_table(pa.table({"id": pa.array(range(s, s + chunk), pa.int64()),
                                    "prompt": [f"{i}{pad}" for i in range(s, s + chunk)],
                                    "temperature": [0.5] * chunk}, schema=schema), row_group_size=5000)
    gc.collect()
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    plan = plan_input(str(path), COLS)
    skip = pa.array(range(0, n, 2), pa.int64())
    count = 0
    for batch in iter_rows(plan, COLS, 1000, skip):
        count += len(batch)
        assert batch[0].error is None and batch[0].overrides == {"temperature": 0.5}
        peak = max(peak, proc.memory_info().rss)
    assert count == n // 2
    assert (peak - base) / 2**20 < 60, f"RSS grew by {(peak - base) / 2**20:.1f} MB"


# ---------------------------------------------------------------- row-level errors
def test_row_level_errors_name_row_and_column(tmp_path: Path) -> None:
    msgs = [
        None, None, [{"role": "user", "content": "hi"}], None, [], [{"role": None, "content": "x"}],
        [{"role": "", "content": "x"}], [{"role": "user", "content": None}], None, None, None, None, None, None,
        [{"role": "system", "content": ""}, {"role": "user", "content": "q"}],
    ]
    data = {
        "id": pa.array([f"r{i}" for i in range(15)]),
        "prompt": ["ok", None, "also", "", None, None, None, None, None, None, "p", "p", "p", "p", None],
        "messages": pa.array(msgs, MSG_TYPE),
        "prompt_token_ids": pa.array([None] * 8 + [[], [3, -1], None, None, None, None, None], pa.list_(pa.int64())),
        "temperature": [0.7, None, None, None, None, None, None, None, None, None, -0.1, None, float("nan"), None, None],
        "top_p": [None] * 11 + [1.5, None, 0.0, 0.9],
        "top_k": pa.array([None] * 11 + [-1, None, None, 5], pa.int64()),
        "max_new_tokens": pa.array([16] + [None] * 12 + [0, None], pa.int64()),
        "seed": pa.array([None] * 14 + [7], pa.int64()),
    }
    f = write(tmp_path / "a.parquet", data)
    rows = {r.id: r for r in all_rows(str(f), batch_rows=4)}
    assert len(rows) == 15
    expect = {
        "r1": "none of the prompt columns",
        "r2": "more than one prompt form",
        "r3": "column 'prompt' is an empty string",
        "r4": "column 'messages' is an empty list",
        "r5": "message 0 has a null or empty role",
        "r6": "message 0 has a null or empty role",
        "r7": "message 0 has null content",
        "r8": "column 'prompt_token_ids' is an empty list",
        "r9": "column 'prompt_token_ids' contains null or negative",
        "r10": "column 'temperature': -0.1 must be finite and >= 0",
        "r11": "column 'top_p': 1.5 must be in (0, 1]",
        "r12": "column 'temperature': nan must be finite",
        "r13": "column 'max_new_tokens': 0 must be >= 1",
    }
    for rid, text in expect.items():
        err = rows[rid].error
        assert err is not None and err.startswith(f"row id {rid!r}:") and text in err, (rid, err)
        assert rows[rid].prompt is None and rows[rid].messages is None and rows[rid].token_ids is None
    assert "column 'top_p': 0.0" in rows["r13"].error and "column 'top_k': -1" in rows["r11"].error
    ok0, ok14 = rows["r0"], rows["r14"]
    assert ok0.error is None and ok0.prompt == "ok" and ok0.overrides == {"temperature": 0.7, "max_new_tokens": 16}
    assert isinstance(ok0.overrides["max_new_tokens"], int)
    assert ok14.error is None and ok14.messages[0] == {"role": "system", "content": ""}
    assert ok14.overrides == {"top_p": 0.9, "top_k": 5, "seed": 7}


def test_invalid_utf8_in_string_column_is_row_error(tmp_path: Path) -> None:
    bad = pa.array([b"good", b"\xff\xfe bad"], pa.binary()).view(pa.string())
    f = write(tmp_path / "a.parquet", {"id": [1, 2], "prompt": bad})
    rows = all_rows(str(f))
    assert rows[0].error is None and rows[0].prompt == "good"
    assert rows[1].error == "row id 2: column 'prompt' is not valid UTF-8"


def test_dataclass_validation() -> None:
    with pytest.raises(ValueError, match="exactly one prompt form"):
        InputRow(id=1, prompt="a", messages=None, token_ids=[1], overrides={}, error=None)
    with pytest.raises(ValueError, match="int or str"):
        InputRow(id=1.5, prompt="a", messages=None, token_ids=None, overrides={}, error=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be empty"):
        InputPlan(files=[], num_rows=0, id_type=pa.int64(), has_id_column=False,
                  present_prompt_columns=["prompt"], override_columns=[])
    with pytest.raises(ValueError, match="unknown override"):
        InputPlan(files=[Path("a")], num_rows=0, id_type=pa.int64(), has_id_column=False,
                  present_prompt_columns=["prompt"], override_columns=["beam"])


@pytest.mark.parametrize("spec,out,reads", [
    ("in", "in/out", True), ("in", "in/_out", False), ("in", "in/.out", False),
    ("in", "out", False), ("in/../in", "in/out", True), ("in/*.parquet", "in/out", False),
    ("in/*.parquet", "in", True), ("in/*", "in/out", True), ("in/*", "in/_out", True),
    ("in/*/*.parquet", "in/out", True), ("in/**/*.parquet", "in/a/b", True),
    ("in/**/*.parquet", "other", False), ("in/p.parquet", "in", False)])
def test_would_read_output_shards_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       spec: str, out: str, reads: bool) -> None:
    """Whether a shard written to `out` would be input to the rerun (an output directory
    inside the input is refused for that); `in/*` globs `in/_out` itself, then all below it."""
    from internlm2_tp.runtime.io import would_read
    write(tmp_path / "in" / "p.parquet", {"prompt": ["x"]})
    monkeypatch.chdir(tmp_path)
    shard = Path(out) / "part-x-00000.parquet"
    assert would_read(spec, shard) is reads
    write(tmp_path / shard, {"id": [1]})   # and it is what resolving the input then does
    assert ((tmp_path / shard).resolve() in [f.resolve() for f in resolve_input_files(spec)]) is reads
