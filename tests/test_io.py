"""runtime/data/io.py: resolving inputs and validating them before the model loads."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from _parquet import COLS, MSG_TYPE, all_rows, write, write_lines
from internlm2_tp.errors import InputError
from internlm2_tp.runtime.data.input_types import InputColumns, InputFile, InputPlan, InputRow
from internlm2_tp.runtime.data.io import plan_input
from internlm2_tp.runtime.data.sources import resolve_input_files

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
    ("json_schema", pa.array([{"type": "object"}] * 2), "string"),
    ("choice", pa.array(["yes", "no"]), "list<string>"),
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
    from internlm2_tp.runtime.data.sources import would_read
    from internlm2_tp.runtime.data.storage import resolve
    write(tmp_path / "in" / "p.parquet", {"prompt": ["x"]})
    monkeypatch.chdir(tmp_path)
    shard = Path(out) / "part-x-00000.parquet"
    assert would_read(spec, resolve(str(shard), "data.output")) is reads
    write(tmp_path / shard, {"id": [1]})   # and it is what resolving the input then does
    assert ((tmp_path / shard).resolve() in [f.resolve() for f in files(spec)]) is reads


# ---------------------------------------------------------------- JSON Lines, hive folders, formats
def test_jsonl_plan_ids_rows_and_formats(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "d" / "a.jsonl", {"id": 3, "prompt": "x"}, "", {"id": 1, "messages": []},
                    '{"id": 2, "prompt": "trunc')   # a bad line whose id can still be read
    b = write_lines(tmp_path / "d" / "b.json.gz", {"id": 7, "prompt_token_ids": [1]}, compress="gz")
    write_lines(tmp_path / "d" / "_SUCCESS")
    plan = plan_input(str(tmp_path / "d"), COLS)
    assert [f.format for f in plan.files] == ["json", "json"] and plan.file_rows == [3, 1]
    assert plan.has_id_column and plan.id_type == pa.int64() and plan.num_rows == 4
    assert [str(f) for f in plan.files] == [str(a), str(b)]
    assert plan.present_prompt_columns == ["prompt", "messages", "prompt_token_ids"]
    txt = write_lines(tmp_path / "p.txt", {"prompt": "x"})
    with pytest.raises(InputError, match=r"p\.txt: cannot tell the format from the name; set data\.format"):
        plan_input(str(txt), COLS)
    assert plan_input(str(txt), COLS, fmt="json").num_rows == 1
    write(tmp_path / "d" / "c.parquet", {"id": [9], "prompt": ["p"]})
    with pytest.raises(InputError, match="holds both Parquet and JSON Lines files"):
        plan_input(str(tmp_path / "d"), COLS)
    assert [f.format for f in plan_input(str(tmp_path / "d"), COLS, fmt="parquet").files] == ["parquet"]


@pytest.mark.parametrize("lines,culprit", [
    (({"id": 1, "prompt": "a"}, {"prompt": "b"}), r"x\.jsonl: line 2 has no id column 'id' \(line 1 has one\)"),
    (({"id": 1, "prompt": "a"}, {"id": "2", "prompt": "b"}),
     r"line 2: id '2' is a string but earlier ids are integers"),
    (({"id": None, "prompt": "a"},), r"x\.jsonl: line 1: id column 'id' is null"),
    (({"id": 1.5, "prompt": "a"},), r"line 1: id column 'id' has unsupported type a number"),
    (({"id": 1, "prompt": "a"}, "garbage without an id"),
     r"x\.jsonl: line 2 is not valid JSON and its 'id' cannot be read"),
    (({"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}), "duplicate ids in column 'id': 1"),
    (("[", '  {"prompt": "a"},', "]"), "no line is a JSON object"),
    (({"text": "a"},), r"none of the prompt columns .* is present; columns found: \['text'\]"),
])
def test_jsonl_job_level_errors(tmp_path: Path, lines: tuple, culprit: str) -> None:
    f = write_lines(tmp_path / "x.jsonl", *lines)
    with pytest.raises(InputError, match=culprit):
        plan_input(str(f), COLS)


def test_jsonl_without_ids_numbers_rows_including_bad_lines(tmp_path: Path) -> None:
    write_lines(tmp_path / "a.jsonl", {"prompt": "a"}, "not json", {"prompt": "c"})
    write_lines(tmp_path / "b.jsonl")   # an empty shard (Spark writes them) is fine
    plan = plan_input(str(tmp_path), COLS)
    assert not plan.has_id_column and plan.num_rows == 3
    assert [(r.id, r.error is None) for r in all_rows(str(tmp_path))] == [(0, True), (1, False), (2, True)]


def test_hive_partitions_become_string_columns(tmp_path: Path) -> None:
    write(tmp_path / "lang=en" / "year=2024" / "p.parquet", {"id": [1], "prompt": ["a"]})
    write(tmp_path / "lang=zh%2Fhans" / "year=__HIVE_DEFAULT_PARTITION__" / "p.parquet", {"id": [2], "prompt": ["b"]})
    plan = plan_input(str(tmp_path), COLS, carry=["lang", "year"])
    assert [f.partitions for f in plan.files] == [(("lang", "en"), ("year", "2024")),
                                                  (("lang", "zh/hans"), ("year", None))]
    assert plan.carry_schema == pa.schema([("lang", pa.string()), ("year", pa.string())])
    got = [(r.id, r.carry.to_pylist()[0]) for r in all_rows(str(tmp_path), carry=["lang", "year"])]
    assert got == [(1, {"lang": "en", "year": "2024"}), (2, {"lang": "zh/hans", "year": None})]
    write(tmp_path / "lang=fr" / "p.parquet", {"id": [3], "prompt": ["c"]})
    with pytest.raises(InputError, match=r"lang=fr/p\.parquet: carried column 'year' .* is missing"):
        plan_input(str(tmp_path), COLS, carry=["year"])
    write(tmp_path / "x" / "prompt=p" / "q.parquet", {"id": [4], "prompt": ["d"]})
    with pytest.raises(InputError, match=r"hive partition folder prompt=\.\.\. names column 'prompt'"):
        plan_input(str(tmp_path / "x"), COLS)


def test_carry_columns_checked_before_the_model(tmp_path: Path) -> None:
    write(tmp_path / "a.parquet", {"id": [1], "prompt": ["a"], "n": pa.array([1], pa.int32()), "error": ["e"]})
    write(tmp_path / "b.parquet", {"id": [2], "prompt": ["b"], "n": pa.array([2], pa.int64()), "error": ["f"]})
    with pytest.raises(InputError, match=r"'error' clashes with an output column .*; rename it in the input"):
        plan_input(str(tmp_path / "a.parquet"), COLS, carry=["error"])
    with pytest.raises(InputError, match=r"'error' clashes .*; list the columns to carry instead of '\*'"):
        plan_input(str(tmp_path / "a.parquet"), COLS, carry=["*"])
    with pytest.raises(InputError, match=r"a\.parquet: carried column 'nope' \(data.carry_columns\) is missing"):
        plan_input(str(tmp_path / "a.parquet"), COLS, carry=["n", "nope"])
    with pytest.raises(InputError, match=r"inconsistent schemas: column 'n' is int32 in .*a\.parquet but int64"):
        plan_input(str(tmp_path), COLS, carry=["n"])
    plan = plan_input(str(tmp_path / "a.parquet"), COLS, carry=["prompt", "n"])   # a prompt form, named
    assert plan.carry_schema.names == ["prompt", "n"]
    f = write_lines(tmp_path / "j.jsonl", {"prompt": "a", "m": 1}, {"prompt": "b", "m": "x"})
    with pytest.raises(InputError, match=r"j\.jsonl: column 'm' cannot be carried, its values have different"):
        plan_input(str(f), COLS, carry=["m"])
    write_lines(tmp_path / "two" / "j.jsonl", {"prompt": "a", "m": 1}, {"prompt": "b", "m": 2.5})
    write_lines(tmp_path / "two" / "k.jsonl", {"prompt": "c", "m": "y"})
    with pytest.raises(InputError, match=r"column 'm' of .*k\.jsonl has values of types double and string"):
        plan_input(str(tmp_path / "two"), COLS, carry=["m"])
