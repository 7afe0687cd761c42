"""runtime/data/storage.py: paths and URIs as pyarrow filesystems, glob rules, whole-file writes and
the store's failures, against a real S3-compatible server on loopback (moto, with IAM auth)."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from internlm2_tp.runtime.data import storage
from internlm2_tp.runtime.data.storage import StorageError, canonical, glob_match, resolve


def opts(loc: storage.Location) -> dict:
    return loc.fs.__reduce__()[1][0]


def test_local_paths_and_file_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for spec in ("rel/x.parquet", f"{tmp_path}/rel/x.parquet", f"file://{tmp_path}/rel/x.parquet",
                 "rel/../rel/x.parquet"):
        loc = resolve(spec, "data.input")
        assert loc.is_local and loc.has_dirs and loc.path == f"{tmp_path}/rel/x.parquet" and loc.uri == loc.path
    assert canonical("rel/x?y") == "rel/x?y"   # a local path is taken as written
    with pytest.raises(StorageError, match="data.output must be a non-empty path"):
        resolve(" ", "data.output")


def test_s3_uri_options_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    loc = resolve("s3://bkt/a/b/", "data.input")
    assert (loc.path, loc.uri, loc.has_dirs, loc.is_local) == ("bkt/a/b", "s3://bkt/a/b", False, False)
    o = opts(loc)
    assert o["region"] == "us-east-1" and o["endpoint_override"] == "" and o["scheme"] == "https"
    assert (o["connect_timeout"], o["request_timeout"]) == (5.0, 5.0)
    # pyarrow ignores AWS_ENDPOINT_URL: we honour it (and the S3-specific variable first)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "cn-north-4")
    o = opts(resolve("s3://bkt/a", "data.input"))
    assert (o["endpoint_override"], o["scheme"], o["region"]) == ("127.0.0.1:9000", "http", "cn-north-4")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://obs.cn-north-4.myhuaweicloud.com")
    o = opts(resolve("s3://bkt/a", "data.input"))
    assert (o["endpoint_override"], o["scheme"]) == ("obs.cn-north-4.myhuaweicloud.com", "https")
    # the URI's own options win, and do not change what identifies the data
    uri = "s3://bkt/a?endpoint_override=127.0.0.1:9100&scheme=http&region=r1&request_timeout=2"
    o = opts(resolve(uri, "data.input"))
    assert (o["endpoint_override"], o["scheme"], o["region"], o["request_timeout"]) == \
        ("127.0.0.1:9100", "http", "r1", 2.0)
    assert canonical(uri) == "s3://bkt/a"


@pytest.mark.parametrize("uri,culprit", [
    ("s3://bkt/a?secret_key=abc", "credentials in the URI (['secret_key'])"),
    ("s3://bkt/a?endpoint=x", "unknown URI option(s) ['endpoint']"),
    ("s3://bkt/a?connect_timeout=soon", "bad URI option"),
    ("s3:///a", "no bucket in the URI"),
    ("nosuchscheme://x/y", "nosuchscheme://x/y"),
])
def test_bad_uris_are_refused_naming_them(uri: str, culprit: str) -> None:
    with pytest.raises(StorageError) as ei:
        resolve(uri, "data.input")
    assert str(ei.value).startswith("data.input ") and culprit in str(ei.value)
    assert "abc" not in str(ei.value)   # a secret is never echoed


@pytest.mark.parametrize("pattern,path,ok", [
    ("*.parquet", "a.parquet", True), ("*.parquet", ".a.parquet", False), (".*", ".a", True),
    ("*", "_SUCCESS", True), ("**/*.parquet", "x/y/a.parquet", True), ("**/*.parquet", "a.parquet", True),
    ("a/*/b", "a/x/y/b", False), ("a/**", "a", True), ("lang=*/*.jsonl", "lang=en/p.jsonl", True),
    ("**/*.parquet", "x/.tmp/a.parquet", False), ("p[0-9].json", "p7.json", True)])
def test_glob_rules(pattern: str, path: str, ok: bool) -> None:
    assert glob_match(pattern.split("/"), path.split("/")) is ok


def test_write_atomic_and_listing_on_s3(s3) -> None:
    loc = s3.loc("out/part-a-00000.parquet")
    storage.write_atomic(loc, b"x" * 100_000, "data.output")
    assert s3.names("out") == ["part-a-00000.parquet"]           # no temp object left
    assert storage.read_bytes(loc, "data.output") == b"x" * 100_000
    s3.put("in/lang=en/a.jsonl", b"{}\n")
    s3.put("in/lang=zh/b.jsonl", b"{}\n")
    s3.put("in/_SUCCESS", b"")
    base, hits = storage.glob(s3.loc("in/lang=*/*.jsonl"), "data.input")
    assert base == s3.loc("in").path and [p.rsplit("/", 2)[1] for p, d in hits if not d] == ["lang=en", "lang=zh"]
    storage.probe_write(s3.loc("out"), "data.output")
    assert s3.names("out") == ["part-a-00000.parquet"]           # the probe object is gone again


def test_store_failures_are_fast_and_named(s3, s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each failure names the URI and the store's own error, in seconds (no minutes of retries)."""
    def fails(doing, culprit: str) -> float:
        t = time.monotonic()
        with pytest.raises(StorageError) as ei:
            doing()
        took = time.monotonic() - t
        assert s3.uri("x") in str(ei.value) and culprit in str(ei.value), str(ei.value)
        assert took < 15, took
        return took

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()   # nothing listens there now
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        fails(lambda: storage.check_reachable(s3.loc("x"), "data.input"), "NETWORK_CONNECTION")
    with monkeypatch.context() as m:
        m.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        fails(lambda: storage.check_reachable(s3.loc("x"), "data.input"), "SIGNATURE_DOES_NOT_MATCH")
    with monkeypatch.context() as m:
        m.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
        fails(lambda: storage.check_reachable(s3.loc("x"), "data.input"), "INVALID_ACCESS_KEY_ID")
    with pytest.raises(StorageError, match="s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"):
        storage.check_reachable(resolve("s3://no-such-bucket/x", "data.output"), "data.output")
    for k, v in s3_server.env("reader").items():
        monkeypatch.setenv(k, v)
    storage.check_reachable(s3.loc("x"), "data.output")   # reading is allowed ...
    fails(lambda: storage.probe_write(s3.loc("x"), "data.output"), "ACCESS_DENIED during PutObject")
    assert storage.info(s3.loc("x"), "data.output").type == pafs.FileType.NotFound
