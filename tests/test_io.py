"""runtime/io.py: resolving inputs and validating them before the model loads."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from _parquet import COLS, MSG_TYPE, all_rows, write
from internlm2_tp.runtime.io import (
    InputColumns,
    InputError,
    InputFile,
    InputPlan,
    InputRow,
    plan_input,
    resolve_input_files,
)

# ---------------------------------------------------------------- resolving inputs
def files(spec: str, fmt: str = "auto") -> list[Path]:
    return [Path(f.path) for f in resolve_input_files(spec, fmt)[1]]


def test_single_file_directory_and_glob(tmp_path: Path) -> None:
    a = write(tmp_path / "d" / "b.parquet", {"prompt": ["x"]})
    b = write(tmp_path / "d" / "sub" / "a.parquet", {"prompt": ["y"]})
    write(tmp_path / "d" / ".hidden.parquet", {"prompt": ["z"]})
    write(tmp_path / "d" / "_tmp" / "c.parquet", {"prompt": ["z"]})
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    (tmp_path / "d" / "_SUCCESS").write_text("")
    assert files(str(a)) == [a]
    assert files(f"file://{a}") == [a]
    assert files(str(tmp_path / "d")) == sorted([a, b], key=str)
    c = tmp_path / "d" / "_tmp" / "c.parquet"   # a glob names it (glob's rules), a directory skips it
    assert files(str(tmp_path / "d" / "**" / "*.parquet")) == sorted([a, b, c], key=str)
    assert files(str(tmp_path / "d" / "b*.parquet")) == [a]
    # notes.txt and _SUCCESS are no data files; folders a glob names are read whole
    assert files(str(tmp_path / "d" / "*")) == sorted([a, b, c], key=str)


@pytest.mark.parametrize("spec", ["missing.parquet", "nomatch-*.parquet", "emptydir"])
def test_no_files_match(tmp_path: Path, spec: str) -> None:
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="no such file|no input files match"):
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


def test_dataclass_validation() -> None:
    with pytest.raises(ValueError, match="exactly one prompt form"):
        InputRow(id=1, prompt="a", messages=None, token_ids=[1], overrides={}, error=None)
    with pytest.raises(ValueError, match="int or str"):
        InputRow(id=1.5, prompt="a", messages=None, token_ids=None, overrides={}, error=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be empty"):
        InputPlan(files=[], num_rows=0, id_type=pa.int64(), has_id_column=False,
                  present_prompt_columns=["prompt"], override_columns=[])
    with pytest.raises(ValueError, match="unknown override"):
        InputPlan(files=[InputFile("a", "a", "parquet")], num_rows=0, id_type=pa.int64(),
                  has_id_column=False, present_prompt_columns=["prompt"], override_columns=["beam"])
    with pytest.raises(ValueError, match="format"):
        InputFile("a", "a", "csv")


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
    from internlm2_tp.runtime.storage import resolve
    write(tmp_path / "in" / "p.parquet", {"prompt": ["x"]})
    monkeypatch.chdir(tmp_path)
    shard = Path(out) / "part-x-00000.parquet"
    assert would_read(spec, resolve(str(shard), "data.output")) is reads
    write(tmp_path / shard, {"id": [1]})   # and it is what resolving the input then does
    assert ((tmp_path / shard).resolve() in [f.resolve() for f in files(spec)]) is reads
