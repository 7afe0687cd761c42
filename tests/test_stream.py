"""runtime/data/stream.py: bounded batches in file order, done ids skipped, row-level errors."""
from __future__ import annotations

import gc
from decimal import Decimal
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from _parquet import COLS, MSG_TYPE, all_rows, write, write_lines
from internlm2_tp.errors import InputError
from internlm2_tp.runtime.data.io import plan_input
from internlm2_tp.runtime.data.stream import iter_rows


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


@pytest.mark.parametrize("where", ["disk", "s3"])
def test_streaming_memory_is_bounded(tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    n, chunk = 200_000, 10_000
    path = tmp_path / "big.parquet"
    pad = "x" * 500  # ~100 MB of prompt text in total: materialising it would blow the budget
    schema = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("temperature", pa.float64())])
    with pq.ParquetWriter(path, schema) as w:
        for s in range(0, n, chunk):
            w.write_table(pa.table({"id": pa.array(range(s, s + chunk), pa.int64()),
                                    "prompt": [f"{i}{pad}" for i in range(s, s + chunk)],
                                    "temperature": [0.5] * chunk}, schema=schema), row_group_size=5000)
    spec = str(path)
    if where == "s3":   # the same file in object storage (copied in C++, never held here)
        s3 = request.getfixturevalue("s3")
        loc = s3.loc("big.parquet")
        pafs.copy_files(spec, loc.path, destination_filesystem=loc.fs)
        spec = s3.uri("big.parquet")
    gc.collect()
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    plan = plan_input(spec, COLS)
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
        "max_new_tokens": pa.array([16] + [None] * 12 + [-1, None], pa.int64()),
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
        "r13": "column 'max_new_tokens': -1 must be >= 0",
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


# ---------------------------------------------------------------- JSON Lines rows
def test_jsonl_bad_lines_are_error_rows_naming_file_and_line(tmp_path: Path) -> None:
    f = write_lines(tmp_path / "p.jsonl",
                    {"id": "a", "prompt": "ok", "temperature": 0.5, "max_new_tokens": 4.0},
                    '{"id": "b", "prompt": "cut off',
                    {"id": "c", "prompt": 5},
                    {"id": "d", "messages": [{"role": "user", "content": ["part"]}]},
                    {"id": "e", "prompt": "x", "max_new_tokens": 2.5, "top_k": True},
                    "",
                    {"id": "f", "prompt_token_ids": [1, 2], "seed": 3},
                    {"id": "g", "messages": [{"role": "user"}]})
    rows = {r.id: r for r in all_rows(str(f), batch_rows=2)}
    assert list(rows) == ["a", "b", "c", "d", "e", "f", "g"]
    assert rows["a"].error is None and rows["a"].overrides == {"temperature": 0.5, "max_new_tokens": 4}
    assert rows["f"].error is None and rows["f"].token_ids == [1, 2] and rows["f"].overrides == {"seed": 3}
    expect = {"b": (2, "not valid JSON (Unterminated string"),
              "c": (3, "column 'prompt' is a number, expected a string"),
              "d": (4, "column 'messages' is an array, expected an array of {role, content}"),
              "e": (5, "column 'max_new_tokens' is 2.5, expected an integer; column 'top_k' is True"),
              "g": (8, "column 'messages': message 0 has null content")}
    for rid, (line, text) in expect.items():
        assert rows[rid].error.startswith(f"row id {rid!r}: {f}:{line}: ") and text in rows[rid].error, rows[rid].error
    skip = pa.array(["a", "c", "zz"])
    assert [r.id for r in all_rows(str(f), skip=skip)] == ["b", "d", "e", "f", "g"]


def test_jsonl_constraint_columns(tmp_path: Path) -> None:
    """Issue 24: json_schema / regex (strings) and choice (an array of strings) in JSON Lines."""
    f = write_lines(tmp_path / "c.jsonl",
                    {"id": 1, "prompt": "x", "json_schema": '{"type": "object"}'},
                    {"id": 2, "prompt": "x", "choice": ["yes", "no"], "regex": None},
                    {"id": 3, "prompt": "x", "json_schema": {"type": "object"}},
                    {"id": 4, "prompt": "x", "choice": "yes"})
    rows = {r.id: r for r in all_rows(str(f))}
    assert rows[1].overrides == {"json_schema": '{"type": "object"}'}
    assert rows[2].overrides == {"choice": ("yes", "no")}
    assert "column 'json_schema' is an object, expected a string" in rows[3].error
    assert "column 'choice' is a string, expected a list of strings" in rows[4].error


def test_jsonl_streaming_memory_is_bounded(tmp_path: Path) -> None:
    n, pad = 100_000, "x" * 500   # ~50 MB of lines: materialising them would blow the budget
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(f'{{"id": {i}, "prompt": "{i}{pad}", "temperature": 0.5}}\n')
    gc.collect()
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    plan = plan_input(str(path), COLS)
    count = 0
    for batch in iter_rows(plan, COLS, 1000, pa.array(range(0, n, 2), pa.int64())):
        count += len(batch)
        peak = max(peak, proc.memory_info().rss)
    assert count == n // 2
    assert (peak - base) / 2**20 < 60, f"RSS grew by {(peak - base) / 2**20:.1f} MB"


# ---------------------------------------------------------------- carried columns
NESTED = pa.struct([("src", pa.string()), ("scores", pa.list_(pa.float32())),
                    ("at", pa.struct([("t", pa.timestamp("ns", "UTC")), ("n", pa.int8())]))])


def test_carried_columns_keep_types_and_values(tmp_path: Path) -> None:
    n = 7
    extra = {"n": pa.array(range(n), pa.int16()), "s": pa.array([f"é{i}" if i % 3 else None for i in range(n)]),
             "l": pa.array([[i, i + 1] for i in range(n)], pa.large_list(pa.int64())),
             "st": pa.array([{"src": f"s{i}", "scores": [0.5] * i,
                              "at": {"t": 1_700_000_000_123_456_789 + i, "n": -i}} for i in range(n)], NESTED),
             "d": pa.array([Decimal(f"{i}.125") for i in range(n)], pa.decimal128(9, 3))}
    a = write(tmp_path / "in" / "a.parquet", {"id": list(range(n)), "prompt": ["p"] * n, **extra}, row_group_size=3)
    write(tmp_path / "in" / "b.parquet", {"id": [100], "prompt": ["q"], "n": pa.array([9], pa.int16()),
                                          "s": pa.array([None], pa.null()),
                                          "l": pa.array([None], pa.large_list(pa.int64())),
                                          "st": pa.array([None], NESTED),
                                          "d": pa.array([Decimal("2.5")], pa.decimal128(9, 3))})
    rows = all_rows(str(tmp_path / "in"), batch_rows=2, carry=["*"], skip=pa.array([1]))
    table = pa.Table.from_batches([r.carry for r in rows])
    src = pq.read_table(a).drop_columns(["id", "prompt"]).filter(pc.not_equal(pc.field("n"), 1))
    assert table.schema == src.schema                       # every type as it came (nested, tz, int16)
    assert table.slice(0, n - 1).equals(src)
    assert table.slice(n - 1).to_pylist() == [{"n": 9, "s": None, "l": None, "st": None, "d": Decimal("2.500")}]


# ---------------------------------------------------------------- issue 17's override columns
def test_every_sampling_setting_is_a_column_of_its_own(tmp_path: Path) -> None:
    """repetition_penalty, stop, stop_token_ids, ignore_eos, n and logprobs read from Parquet
    and JSON Lines into the row's overrides (null: the job's), each checked by its rule."""
    f = write(tmp_path / "a.parquet", {
        "id": [1, 2, 3],
        "prompt": ["a", "b", "c"],
        "repetition_penalty": pa.array([1.2, None, 0.0], pa.float64()),
        "stop": pa.array([["END", "##"], None, None], pa.list_(pa.string())),
        "stop_token_ids": pa.array([[5, 6], None, [-1]], pa.list_(pa.int64())),
        "ignore_eos": pa.array([True, None, None], pa.bool_()),
        "n": pa.array([3, None, 0], pa.int32()),
        "logprobs": pa.array([4, None, None], pa.int8())})
    plan = plan_input(str(f), COLS)
    assert set(plan.override_columns) == {"repetition_penalty", "stop", "stop_token_ids",
                                          "ignore_eos", "n", "logprobs"}
    r1, r2, r3 = all_rows(str(f))
    assert r1.overrides == {"repetition_penalty": 1.2, "stop": ("END", "##"),
                            "stop_token_ids": (5, 6), "ignore_eos": True, "n": 3, "logprobs": 4}
    assert r2.error is None and r2.overrides == {}
    assert r3.error.startswith("row id 3: ") and "column 'repetition_penalty': 0.0 must be" in r3.error
    assert "column 'stop_token_ids': (-1,) must hold non-negative" in r3.error
    assert "column 'n': 0 must be in [1, 1024]" in r3.error
    j = write_lines(tmp_path / "p.jsonl",
                    {"id": "a", "prompt": "x", "stop": ["Q:"], "ignore_eos": True, "n": 2},
                    {"id": "b", "prompt": "x", "stop": "Q:", "ignore_eos": 1, "logprobs": 1.5})
    a, b = all_rows(str(j))
    assert a.overrides == {"stop": ("Q:",), "ignore_eos": True, "n": 2}
    assert "column 'stop' is a string, expected a list of strings" in b.error
    assert "column 'ignore_eos' is 1, expected a boolean" in b.error
    assert "column 'logprobs' is 1.5, expected an integer" in b.error


def test_a_column_of_the_wrong_type_is_refused_before_any_row(tmp_path: Path) -> None:
    f = write(tmp_path / "a.parquet", {"id": [1], "prompt": ["a"], "stop": ["END"]})
    with pytest.raises(InputError, match="column 'stop' has type string, expected list<string>"):
        plan_input(str(f), COLS)
