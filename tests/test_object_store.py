"""Issue 16: the batch job reading and writing object storage (a real S3-compatible server on
loopback, moto with IAM auth on, reached through pyarrow's S3 client over HTTP and the standard
AWS_* variables): the same results as on local files at tp 2, exactly once across a driver
SIGKILL, carried columns, hive folders, JSON Lines, and each failure of the store exiting 2 in
seconds, naming the URI and the store's own error, before any weight is loaded."""
from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _job import job_args, read_out, run_cli, run_inprocess, run_job, write_prompts
from _procs import finish, kill_stray_jobs, start_job
from internlm2_tp.errors import EXIT_BAD_INPUT

pytestmark = pytest.mark.slow   # jobs on a Ray cluster against the S3 server

META = pa.struct([("src", pa.string()), ("tags", pa.list_(pa.string())), ("w", pa.float32())])


@pytest.fixture(scope="module")
def ckpt(make_ckpt) -> Path:
    return make_ckpt(dtype="float32")


@pytest.fixture(autouse=True)
def _no_stray_job():
    yield
    kill_stray_jobs()


def prompts_with_metadata(path: Path, n: int) -> Path:
    """The demo-style prompts plus columns to carry: int, string, list, nested struct."""
    t = pq.read_table(write_prompts(path, n))
    t = t.append_column("num", pa.array([i * 7 for i in range(n)], pa.int32()))
    t = t.append_column("src", pa.array([f"doc-{i}" if i % 4 else None for i in range(n)]))
    t = t.append_column("tags", pa.array([[f"t{j}" for j in range(i % 3)] for i in range(n)]))
    t = t.append_column("meta", pa.array([{"src": f"s{i}", "tags": ["a"] * (i % 2), "w": i / 4} for i in range(n)],
                                         META))
    pq.write_table(t, path)
    return path


def s3_args(ckpt: Path, data: str, out: str, *extra: str) -> list[str]:
    args = job_args(ckpt, Path("x"), Path("x"), *extra)
    return [a for a in args if not a.startswith(("data.input=", "data.output="))] + \
        [f"data.input={data}", f"data.output={out}"]


def same_rows(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == b[k], (k, a[k], b[k])


def test_s3_to_s3_at_tp2_equals_the_job_on_local_files(ckpt, s3, ray_gcs, tmp_path):
    local = prompts_with_metadata(tmp_path / "prompts.parquet", 24)
    data = s3.put("in/prompts.parquet", local.read_bytes())
    extra = ("parallel.tp=2", f"ray.address={ray_gcs}", "data.shard_rows=10", "data.carry_columns=[num,src,tags,meta]")
    finish(start_job(job_args(ckpt, local, tmp_path / "out", *extra)))
    log = finish(start_job(s3_args(ckpt, data, s3.uri("out"), *extra)))
    assert f"Output: {s3.uri('out')}/part-*.parquet" in log      # the summary read the store back
    got, want = s3.read_out("out"), read_out(tmp_path / "out")
    assert len(got) == 24 and all(r["error"] is None for r in got.values())
    same_rows(got, want)                                         # completions and carried columns
    assert got[5]["meta"] == {"src": "s5", "tags": ["a"], "w": 1.25} and got[5]["tags"] == ["t0", "t1"]
    names = s3.names("out")
    assert names[:2] == ["_job.json", "_manifest.json"] and all(n.startswith("part-") for n in names[2:])
    loc = s3.loc("out")
    schema = pq.read_table(loc.path, filesystem=loc.fs).schema   # the prefix opens as one dataset
    assert schema.field("meta").type == META and schema.field("num").type == pa.int32()


def test_sigkill_driver_then_rerun_on_s3_exactly_once(ckpt, s3, ray_gcs, tmp_path):
    rows, fast = 120, ("generation.max_new_tokens=8", "data.shard_rows=20", "engine.max_num_seqs=16")
    local = write_prompts(tmp_path / "prompts.parquet", rows)
    data = s3.put("in/prompts.parquet", local.read_bytes())
    run_inprocess(job_args(ckpt, local, tmp_path / "ref", *fast))
    args = s3_args(ckpt, data, s3.uri("out"), *fast, f"ray.address={ray_gcs}")
    proc = start_job(args)
    end = time.time() + 240
    while len([n for n in s3.names("out") if n.startswith("part-")]) < 2:
        assert proc.poll() is None and time.time() < end, "the job should still be running"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = s3.read_out("out")   # whole shards only: every visible part reads
    assert 0 < len(before) < rows and "_manifest.json" not in s3.names("out")
    finish(start_job(args))
    got, ref = s3.read_out("out"), read_out(tmp_path / "ref")
    assert {k: r["completion_token_ids"] for k, r in got.items()} == \
        {k: r["completion_token_ids"] for k, r in ref.items()}
    assert not [n for n in s3.names("out") if n.endswith(".tmp")] and "_manifest.json" in s3.names("out")


def test_hive_partitioned_parquet_on_s3(ckpt, s3, capsys):
    for lang, ids in (("en", [0, 1, 2]), ("zh", [3, 4])):
        s3.put_table(f"in/lang={lang}/part-0.parquet", pa.table({"id": ids, "prompt": [f"p{i}" for i in ids]}))
    s3.put("in/_SUCCESS", b"")
    rc, err = run_job(s3_args(ckpt, s3.uri("in"), s3.uri("out"), "data.carry_columns=[lang]"), capsys)
    assert rc == 0, err
    got = s3.read_out("out")
    assert {k: r["lang"] for k, r in got.items()} == {0: "en", 1: "en", 2: "en", 3: "zh", 4: "zh"}


def test_jsonl_on_s3_with_a_malformed_line(ckpt, s3, capsys):
    lines = [b'{"id": "a", "prompt": "The capital of France is", "num": 1}',
             b'{"id": "b", "messages": [{"role": "user", "content": "hi"}], "num": 2}',
             b'{"id": "c", "prompt": "cut off here',
             b'{"id": "d", "prompt_token_ids": [1, 5, 6], "num": 4}']
    data = s3.put("in/prompts.jsonl", b"\n".join(lines) + b"\n")
    rc, err = run_job(s3_args(ckpt, data, s3.uri("out"), "data.carry_columns=['*']"), capsys)
    assert rc == 0, err
    got = s3.read_out("out")
    assert sorted(got) == ["a", "b", "c", "d"] and [got[k]["num"] for k in "abcd"] == [1, 2, None, 4]
    assert got["c"]["finish_reason"] == "error"
    assert got["c"]["error"].startswith(f"row id 'c': {data}:3: not valid JSON"), got["c"]["error"]
    assert all(got[k]["error"] is None and got[k]["completion_tokens"] >= 1 for k in "abd")


@pytest.fixture
def silent_endpoint():
    """A loopback port that accepts connections and never answers (a hung store)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def _closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


FAILURES = [  # (case, environment change, which side, the store's words)
    ("unreachable endpoint", lambda srv, hung: {"AWS_ENDPOINT_URL": _closed_port()}, "input",
     "NETWORK_CONNECTION"),
    ("endpoint that never answers", lambda srv, hung: {"AWS_ENDPOINT_URL": hung}, "input", "Timeout was reached"),
    ("bad credentials", lambda srv, hung: {"AWS_SECRET_ACCESS_KEY": "wrong"}, "input", "SIGNATURE_DOES_NOT_MATCH"),
    ("missing bucket", lambda srv, hung: {}, "bucket", "bucket 'no-such-bucket' does not exist"),
    ("no write permission", lambda srv, hung: srv.env("reader"), "output", "ACCESS_DENIED during PutObject"),
]


@pytest.mark.parametrize("case,env,side,words", FAILURES, ids=[f[0] for f in FAILURES])
def test_store_failure_exits_2_fast_naming_uri_and_error(case, env, side, words, ckpt, s3, s3_server,
                                                         silent_endpoint, tmp_path):
    """Through the real command line: exit 2, one line naming the setting, the URI and the
    store's error, no traceback, well within 30 s (the job stops before Ray starts)."""
    data = s3.put("in/p.parquet", write_prompts(tmp_path / "p.parquet", 3).read_bytes())
    out = "s3://no-such-bucket/out" if side == "bucket" else s3.uri("out")
    t = time.monotonic()
    p = run_cli("jobs/batch_infer.py", s3_args(ckpt, data, out), timeout=120,
                env_extra=env(s3_server, silent_endpoint))
    took = time.monotonic() - t
    print(f"{case}: exit {p.returncode} after {took:.1f} s: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == EXIT_BAD_INPUT, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    setting, uri = ("data.input", data) if side == "input" else ("data.output", out)
    assert last.startswith(f"error: {setting} {uri}") and words in last, last
    assert "Traceback" not in p.stderr and "memory plan" not in p.stderr
    assert took < 30, took
    assert [n for n in s3.names("out")] == []    # nothing written, not even a probe left


def test_output_inside_an_s3_input_is_refused(ckpt, s3, capsys):
    s3.put_table("in/p.parquet", pa.table({"id": [1], "prompt": ["a"]}))
    for out, words in ((s3.uri("in/out"), "is inside data.input"), (s3.uri(""), "contains input file")):
        rc, err = run_job(s3_args(ckpt, s3.uri("in"), out), capsys)
        assert rc == EXIT_BAD_INPUT and words in err, err
    assert s3.names("in") == ["p.parquet"]
