from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from internlm2_tp.runtime.data import storage as storage_mod
from internlm2_tp.errors import OutputDirError
from internlm2_tp.runtime.data.output import OutputRow, ShardWriter, output_schema
from internlm2_tp.runtime.data.output_dir import (fingerprint_diff, prepare_output_dir, read_output_ids,
                                             write_manifest)

FP = {"model": {"path": "/m", "dtype": "bf16"}, "input": "in.parquet", "max_new_tokens": 32}
REPO = Path(__file__).resolve().parents[1]


def ok(i: int | str, toks: int = 2) -> OutputRow:
    return OutputRow(id=i, completion="x" * toks, completion_token_ids=list(range(toks)), prompt_tokens=5,
                     completion_tokens=toks, finish_reason="length", error=None)


def parts(d: Path) -> list[Path]:
    return sorted(d.glob("part-*.parquet"))


def test_output_schema() -> None:
    s = output_schema(pa.string())
    assert s.names == ["id", "completion", "completion_token_ids", "prompt_tokens", "completion_tokens",
                       "finish_reason", "error"]
    assert s.field("completion_token_ids").type == pa.list_(pa.int32())
    assert s.field("prompt_tokens").type == pa.int32() and output_schema(pa.int64()).field("id").type == pa.int64()
    with pytest.raises(ValueError, match="integer or string"):
        output_schema(pa.float64())


def test_output_row_validation() -> None:
    OutputRow(id="a", completion="", completion_token_ids=[], prompt_tokens=0, completion_tokens=0,
              finish_reason="error", error="row id 'a': boom")
    bad = [
        dict(finish_reason="done"),
        dict(finish_reason="error"),
        dict(error="oops"),
        dict(completion_tokens=3),
        dict(completion_token_ids=[1, -2], completion_tokens=2),
        dict(prompt_tokens=-1),
        dict(completion=None),
        dict(id=1.5),
    ]
    for kw in bad:
        base = dict(id=1, completion="ab", completion_token_ids=[1, 2], prompt_tokens=3, completion_tokens=2,
                    finish_reason="stop", error=None)
        base.update(kw)
        with pytest.raises(ValueError):
            OutputRow(**base)


def test_writer_shards_and_roundtrip(tmp_path: Path) -> None:
    assert prepare_output_dir(tmp_path / "out", FP, overwrite=False) is None
    d = tmp_path / "out"
    w = ShardWriter(d, pa.int64(), shard_rows=3, run_id="r1")
    for i in range(7):
        w.add(ok(i))
    assert [p.name for p in parts(d)] == ["part-r1-00000.parquet", "part-r1-00001.parquet"]
    assert w.rows_written == 6
    w.add(OutputRow(id=7, completion="", completion_token_ids=[], prompt_tokens=0, completion_tokens=0,
                    finish_reason="error", error="row id 7: column 'prompt' is an empty string"))
    w.close()
    assert w.rows_written == 8 and len(parts(d)) == 3 and w.files == [p.name for p in parts(d)]
    t = pq.read_table(parts(d)[2])
    assert t.schema.equals(output_schema(pa.int64()))
    assert t.column("error").to_pylist() == [None, "row id 7: column 'prompt' is an empty string"]
    assert t.column("finish_reason").to_pylist() == ["length", "error"]
    with pytest.raises(RuntimeError, match="closed"):
        w.add(ok(9))
    assert sorted(read_output_ids(d).to_pylist()) == list(range(8))
    # a reused run id continues the sequence instead of replacing a shard
    with ShardWriter(d, pa.int64(), shard_rows=10, run_id="r1") as w2:
        w2.add(ok(100))
    assert parts(d)[-1].name == "part-r1-00003.parquet"


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run_id"):
        ShardWriter(tmp_path, pa.int64(), run_id="../escape")
    with pytest.raises(ValueError, match="shard_rows"):
        ShardWriter(tmp_path, pa.int64(), shard_rows=0)
    with pytest.raises(OutputDirError, match="does not exist"):
        ShardWriter(tmp_path / "nope", pa.int64())
    w = ShardWriter(tmp_path, pa.string())
    with pytest.raises(ValueError, match="does not match output id type"):
        w.add(ok(1))
    with pytest.raises(TypeError):
        w.add({"id": "a"})  # type: ignore[arg-type]


def test_no_part_file_before_flush(tmp_path: Path) -> None:
    prepare_output_dir(tmp_path, FP, overwrite=False)
    w = ShardWriter(tmp_path, pa.string(), shard_rows=100)
    for i in range(99):
        w.add(ok(f"id{i}"))
    assert parts(tmp_path) == [] and read_output_ids(tmp_path) is None
    w.flush()
    assert len(parts(tmp_path)) == 1 and len(read_output_ids(tmp_path)) == 99
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_rename_leaves_no_part_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = ShardWriter(tmp_path, pa.int64(), shard_rows=10)
    w.add(ok(1))

    def boom(a: object, b: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(storage_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        w.flush()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    w.flush()  # rows were kept and can be written once the problem is gone
    assert len(parts(tmp_path)) == 1 and w.rows_written == 1


def _child(code: str, d: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(d)], env=env)


@pytest.mark.slow   # a writer process, killed
def test_sigkill_between_write_and_rename_leaves_only_temp(tmp_path: Path) -> None:
    d = tmp_path / "out"
    prepare_output_dir(d, FP, overwrite=False)
    # the child kills itself at the first fsync, i.e. with the temp file written but not yet renamed
    proc = _child("""
        import os, signal, sys
        import pyarrow as pa
        from internlm2_tp.runtime.data.output import OutputRow, ShardWriter
        w = ShardWriter(sys.argv[1], pa.int64(), shard_rows=50)
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        for i in range(50):
            w.add(OutputRow(i, "c", [1], 1, 1, "stop", None))
    """, d)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    names = sorted(p.name for p in d.iterdir())
    assert parts(d) == [] and len(names) == 2 and names[0].startswith(".part-") and names[0].endswith(".tmp")
    assert prepare_output_dir(d, FP, overwrite=False) is None  # stale temp removed, nothing done
    assert sorted(p.name for p in d.iterdir()) == ["_job.json"]


@pytest.mark.slow   # a writer process, killed
def test_sigkill_mid_stream_keeps_complete_shards(tmp_path: Path) -> None:
    d = tmp_path / "out"
    prepare_output_dir(d, FP, overwrite=False)
    proc = _child("""
        import sys
        import pyarrow as pa
        from internlm2_tp.runtime.data.output import OutputRow, ShardWriter
        w = ShardWriter(sys.argv[1], pa.int64(), shard_rows=200)
        i = 0
        while True:
            w.add(OutputRow(i, "c" * 50, list(range(50)), 1, 50, "stop", None))
            i += 1
    """, d)
    deadline = time.monotonic() + 30
    while len(parts(d)) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(parts(d)) >= 3
    for p in parts(d):  # every visible part file is complete and readable
        assert pq.read_table(p).num_rows == 200
    done = prepare_output_dir(d, FP, overwrite=False)
    assert sorted(done.to_pylist()) == list(range(200 * len(parts(d))))
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_resume_fingerprint_and_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "out"
    assert prepare_output_dir(d, FP, overwrite=False) is None
    assert json.loads((d / "_job.json").read_text())["fingerprint"] == FP
    with ShardWriter(d, pa.int64(), shard_rows=2) as w:
        for i in range(5):
            w.add(ok(i))
    write_manifest(d, {"rows": 5})
    # same job again: resume with the done ids; the stale manifest goes away until the run ends
    done = prepare_output_dir(d, json.loads(json.dumps(FP)), overwrite=False)
    assert done.type == pa.int64() and sorted(done.to_pylist()) == [0, 1, 2, 3, 4]
    assert not (d / "_manifest.json").exists()
    other = {**FP, "model": {"path": "/m", "dtype": "fp16"}, "extra": 1}
    with pytest.raises(OutputDirError, match=r"fingerprint keys differ: \['extra', 'model.dtype'\]"):
        prepare_output_dir(d, other, overwrite=False)
    assert len(parts(d)) == 3  # nothing deleted on refusal
    assert prepare_output_dir(d, other, overwrite=True) is None
    assert parts(d) == [] and json.loads((d / "_job.json").read_text())["fingerprint"] == other


def test_parts_without_job_file_are_refused(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, pa.int64()) as w:
        w.add(ok(1))
    with pytest.raises(OutputDirError, match="without _job.json"):
        prepare_output_dir(tmp_path, FP, overwrite=False)
    assert prepare_output_dir(tmp_path, FP, overwrite=True) is None


def test_foreign_files_refused_even_with_overwrite(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    for overwrite in (False, True):
        with pytest.raises(OutputDirError, match=r"did not write: \['notes.txt', 'sub'\]"):
            prepare_output_dir(tmp_path, FP, overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "_job.json").exists()
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(OutputDirError, match="not a directory"):
        prepare_output_dir(f, FP, overwrite=True)


def test_duplicate_ids_across_parts_are_an_error(tmp_path: Path) -> None:
    prepare_output_dir(tmp_path, FP, overwrite=False)
    for run in ("a", "b", "c"):
        with ShardWriter(tmp_path, pa.string(), run_id=run) as w:
            w.add(ok("same" if run != "b" else "other"))
    with pytest.raises(OutputDirError, match=r"\['same'\] appear more than once") as ei:
        prepare_output_dir(tmp_path, FP, overwrite=False)
    assert "part-a-00000.parquet" in str(ei.value) and "part-c-00000.parquet" in str(ei.value)
    assert "part-b-" not in str(ei.value)


def test_corrupt_part_file_named(tmp_path: Path) -> None:
    prepare_output_dir(tmp_path, FP, overwrite=False)
    (tmp_path / "part-x-00000.parquet").write_bytes(b"garbage")
    with pytest.raises(OutputDirError, match="part-x-00000.parquet"):
        read_output_ids(tmp_path)


def test_manifest_written_atomically(tmp_path: Path) -> None:
    write_manifest(tmp_path, {"rows": 3, "errors": 1, "files": ["part-a-00000.parquet"]})
    assert json.loads((tmp_path / "_manifest.json").read_text())["rows"] == 3
    with pytest.raises(TypeError, match="JSON"):
        write_manifest(tmp_path, {"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_manifest.json"]


def test_fingerprint_diff() -> None:
    assert fingerprint_diff(FP, FP) == []
    assert fingerprint_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 0}) == ["b.c", "d"]
    with pytest.raises(TypeError, match="JSON"):
        prepare_output_dir(Path("/nonexistent-never-created"), {"x": {1, 2}}, overwrite=False)


# ---------------------------------------------------------------- carried columns, old layouts, readers
CARRY = pa.schema([("lang", pa.string()), ("meta", pa.struct([("k", pa.int16()), ("v", pa.list_(pa.string()))]))])


def carry(i: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([{"lang": f"l{i}", "meta": {"k": i, "v": ["x"] * i}}], schema=CARRY)


def write_output(d: Path | str, n: int = 10, shard_rows: int = 4) -> None:
    prepare_output_dir(d, FP, overwrite=False)
    with ShardWriter(d, pa.int64(), shard_rows=shard_rows, carry=CARRY) as w:
        for i in range(n):
            w.add(ok(i), carry(i))
    write_manifest(d, {"rows": n})


def test_carried_columns_follow_our_columns(tmp_path: Path) -> None:
    write_output(tmp_path)
    t = pq.read_table(parts(tmp_path)[1])
    assert t.schema.equals(output_schema(pa.int64(), CARRY)) and t.schema.names[-2:] == ["lang", "meta"]
    assert t.select(["id", "lang", "meta"]).to_pylist()[0] == {"id": 4, "lang": "l4", "meta": {"k": 4, "v": ["x"] * 4}}
    w = ShardWriter(tmp_path, pa.int64(), carry=CARRY)
    with pytest.raises(ValueError, match="carried columns must be one row of"):
        w.add(ok(50))
    with pytest.raises(ValueError, match="carried columns must be one row of"):
        w.add(ok(50), pa.RecordBatch.from_pylist([{"lang": "x"}]))
    with pytest.raises(ValueError, match="clash"):
        output_schema(pa.int64(), pa.schema([("completion", pa.string())]))


def test_old_job_json_still_resumes_and_is_renamed(tmp_path: Path) -> None:
    """A directory written before _job.json (job.json beside the shards) resumes; the file is
    renamed so that the directory opens as a dataset. Another job's old directory is refused
    and left as it was."""
    with ShardWriter(tmp_path, pa.int64(), shard_rows=2, run_id="old") as w:
        for i in range(3):
            w.add(ok(i))
    old = {"format": "internlm2_tp.output/1", "fingerprint": FP, "created_at": "2026-01-01T00:00:00+0000"}
    (tmp_path / "job.json").write_text(json.dumps(old))
    with pytest.raises(OutputDirError, match=r"fingerprint keys differ: \['extra'\]"):
        prepare_output_dir(tmp_path, {**FP, "extra": 1}, overwrite=False)
    assert (tmp_path / "job.json").exists() and not (tmp_path / "_job.json").exists()
    assert sorted(prepare_output_dir(tmp_path, FP, overwrite=False).to_pylist()) == [0, 1, 2]
    assert json.loads((tmp_path / "_job.json").read_text()) == old and not (tmp_path / "job.json").exists()
    assert pq.read_table(tmp_path).num_rows == 3


@pytest.mark.slow   # a Ray cluster (Ray Data), readers as processes
def test_output_opens_as_one_dataset_in_every_reader(tmp_path: Path, ray_gcs: str) -> None:
    """The one-liners a user tries first: each reader skips _job.json, _manifest.json and a
    leftover temp file, and sees every row once with the carried columns."""
    import duckdb
    import pandas
    import polars

    out = tmp_path / "out"
    write_output(out)
    (out / ".part-x-00000.parquet.0a1b2c.tmp").write_bytes(b"half a shard")
    want = list(range(10))
    assert sorted(pq.read_table(out).column("id").to_pylist()) == want
    df = pandas.read_parquet(out)
    assert sorted(df["id"]) == want and list(df.columns) == output_schema(pa.int64(), CARRY).names
    assert sorted(polars.read_parquet(f"{out}/*.parquet")["id"].to_list()) == want
    assert sorted(r[0] for r in duckdb.sql(f"select id from read_parquet('{out}/*.parquet')").fetchall()) == want
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "import ray.data; ds = ray.data.read_parquet(sys.argv[2]); "
            "print(sorted(r['id'] for r in ds.take_all()), ds.schema().names)")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    p = subprocess.run([sys.executable, "-c", code, ray_gcs, str(out)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == f"{want} {output_schema(pa.int64(), CARRY).names}"


def test_object_store_output_dir(s3) -> None:
    """The same directory protocol on S3: shards appear whole, a stale temp object goes at the
    next start, resume reads the listing, pyarrow reads the prefix as one dataset."""
    out = s3.uri("out")
    write_output(out, n=7, shard_rows=3)
    s3.put("out/.part-r-00009.parquet.abc123.tmp", b"half")
    names = s3.names("out")
    assert names[:3] == [".part-r-00009.parquet.abc123.tmp", "_job.json", "_manifest.json"]
    assert len([n for n in names if n.startswith("part-")]) == 3 and len(names) == 6
    assert sorted(prepare_output_dir(out, FP, overwrite=False).to_pylist()) == list(range(7))
    assert ".part-r-00009.parquet.abc123.tmp" not in s3.names("out") and "_manifest.json" not in s3.names("out")
    loc = s3.loc("out")
    t = pq.read_table(loc.path, filesystem=loc.fs)
    assert sorted(t.column("id").to_pylist()) == list(range(7)) and t.schema.names[-2:] == ["lang", "meta"]
    with pytest.raises(OutputDirError, match=r"fingerprint keys differ: \['extra'\]"):
        prepare_output_dir(out, {**FP, "extra": 1}, overwrite=False)
    s3.put("out/notes.txt", b"mine")
    with pytest.raises(OutputDirError, match=r"did not write: \['notes.txt'\]"):
        prepare_output_dir(out, FP, overwrite=True)
