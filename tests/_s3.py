"""A real S3-compatible server on loopback for the tests: moto's standalone server (``python -m
moto.server``) in its own process, with IAM authentication switched on after set-up, so bad
credentials and missing permissions are refused as a real store refuses them. The project talks
to it only through pyarrow's S3 client over HTTP; boto3 is used here to set the server up."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from internlm2_tp.parallel.group import free_port

BUCKET = "lake"


@dataclass(frozen=True)
class S3Server:
    endpoint: str                  # http://127.0.0.1:PORT
    keys: dict[str, tuple[str, str]]   # user -> (access key id, secret): admin (s3:*), reader (read only)

    def env(self, user: str = "admin", **extra: str) -> dict[str, str]:
        """The standard AWS variables a job (or pyarrow) reads; no metadata-service lookups."""
        key, secret = self.keys[user] if user in self.keys else (user, "not-a-secret")
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", **extra}


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{port} within {timeout}s")


def _setup(endpoint: str) -> dict[str, tuple[str, str]]:
    import boto3

    kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
              aws_secret_access_key="setup")
    iam, s3 = boto3.client("iam", **kw), boto3.client("s3", **kw)
    keys = {}
    for user, actions in (("admin", ["s3:*"]),
                          ("reader", ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"])):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (k["AccessKeyId"], k["SecretAccessKey"])
    s3.create_bucket(Bucket=BUCKET)
    # From here on every request must be signed by a known key and allowed by its policy.
    req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=30).read()
    return keys


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    port = free_port()
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        yield S3Server(endpoint, _setup(endpoint))
    finally:
        proc.kill()
        proc.wait()


class S3Prefix:
    """A fresh prefix of the test bucket, with helpers that go through the project's storage
    layer (the credentials are the ones in the environment)."""

    def __init__(self, server: S3Server, name: str):
        self.server, self.root = server, f"s3://{BUCKET}/{name}"

    def uri(self, rel: str = "") -> str:
        return f"{self.root}/{rel}".rstrip("/")

    def loc(self, rel: str = ""):
        from internlm2_tp.runtime.data.storage import resolve
        return resolve(self.uri(rel), "test")

    def put(self, rel: str, data: bytes) -> str:
        loc = self.loc(rel)
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
        return self.uri(rel)

    def put_table(self, rel: str, table, **kw) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **kw)
        return self.put(rel, sink.getvalue().to_pybytes())

    def names(self, rel: str = "") -> list[str]:
        import pyarrow.fs as pafs
        loc = self.loc(rel)
        return sorted(i.base_name for i in loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True)))

    def read_out(self, rel: str) -> dict:
        """id -> row over the part files; asserts every id appears once."""
        import pyarrow.parquet as pq
        loc, rows = self.loc(rel), {}
        for n in self.names(rel):
            if n.startswith("part-"):
                with loc.fs.open_input_file(f"{loc.path}/{n}") as f:
                    for r in pq.read_table(f).to_pylist():
                        assert r["id"] not in rows, f"id {r['id']} written twice"
                        rows[r["id"]] = r
        return rows
