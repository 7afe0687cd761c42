from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The suite's own Ray clusters run without token auth (private, stopped with the session), and an
# in-process `ray.init()` must not create a token in the shared ~/.ray. Tests of Ray's defaults
# (tests/test_cluster.py) build their environment without it, in a private HOME.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def real_tokenizer_path() -> Path | None:
    from internlm2_tp.testing.tokenizer_files import find_default_tokenizer_model

    return find_default_tokenizer_model()


@pytest.fixture(scope="session")
def real_tokenizer() -> Path:
    p = real_tokenizer_path()
    if p is None:
        pytest.skip("the real InternLM2 tokenizer.model is absent (expected at "
                    "../shared/data/tokenizer_internlm2.model or $INTERNLM2_TOKENIZER)")
    return p


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """make_ckpt(**TinySpec fields) -> checkpoint dir, cached per distinct spec."""
    from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint

    cache: dict[str, Path] = {}

    def make(**kw) -> Path:
        key = repr(sorted(kw.items()))
        if key not in cache:
            d = tmp_path_factory.mktemp("ckpt")
            cache[key] = write_tiny_checkpoint(d, TinySpec(**kw))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def ray_cluster(ray_head: dict[str, str]) -> str:
    """The dashboard address of the session's Ray cluster, which `ray job submit` uses."""
    return ray_head["dashboard"]


@pytest.fixture(scope="session")
def ray_gcs(ray_head: dict[str, str]) -> str:
    """The GCS address (host:port) of the session's Ray cluster, for `ray.address=`."""
    return ray_head["gcs"]


@pytest.fixture(scope="session")
def ray_head():
    """A real local Ray cluster (`ray start --head`) of its own, stopped at the end of the
    session without touching any other Ray cluster on the machine."""
    from _ray import private_ray_head

    with private_ray_head(num_cpus=2, dashboard=True) as addrs:
        yield addrs


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on loopback, for the session."""
    from _s3 import moto_server

    with moto_server() as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch: pytest.MonkeyPatch):
    """The server's credentials and endpoint in this test's environment (AWS_* variables, as a
    user sets them), and a fresh prefix of its bucket."""
    import secrets

    from _s3 import S3Prefix

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return S3Prefix(s3_server, f"t-{secrets.token_hex(4)}")
