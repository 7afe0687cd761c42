"""S3-compatible stores (AWS S3, Huawei OBS, MinIO) configured the standard way: the keys and
region from ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``; the endpoint from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (pyarrow ignores both itself, apache/arrow#49643)
or from the URI's own ``?endpoint_override=host:port&scheme=http``.

Timeouts and retries are bounded, so a dead or silent endpoint fails in seconds, not minutes;
the region is always given, so the SDK never asks a cloud metadata service for it."""
from __future__ import annotations

import os
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

# URI query keys accepted (max_attempts is ours: the AWS standard retry strategy's attempts).
OPTIONS = ("endpoint_override", "scheme", "region", "connect_timeout", "request_timeout",
           "max_attempts", "force_virtual_addressing", "anonymous")
# Refused in a URI: the URI is logged and kept in _job.json and _manifest.json.
SECRET_OPTIONS = ("access_key", "secret_key", "session_token")
# Seconds. A dead endpoint costs connect_timeout per attempt, a silent one request_timeout (the
# SDK's "less than 1 byte/s for this long"), times max_attempts, plus the SDK's backoff.
DEFAULTS = {"connect_timeout": 5.0, "request_timeout": 5.0, "max_attempts": 3}


def _flag(v: str) -> bool:
    return v.lower() in ("1", "true", "yes")


def s3_filesystem(query: str) -> pafs.S3FileSystem:
    """The filesystem for an ``s3://`` URI's query string and the environment; ValueError
    (message only: the caller names the URI) for a bad or secret option."""
    opts = dict(parse_qsl(query, keep_blank_values=True))
    secret = [k for k in opts if k in SECRET_OPTIONS]
    if secret:
        raise ValueError(f"credentials in the URI ({secret}) would be written to logs and "
                         "_job.json; use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    unknown = [k for k in opts if k not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown URI option(s) {unknown}; known: {list(OPTIONS)}")
    env_ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if "endpoint_override" not in opts and env_ep:
        e = urlsplit(env_ep if "://" in env_ep else "https://" + env_ep)
        opts.setdefault("scheme", e.scheme)
        opts["endpoint_override"] = e.netloc
    o = {**{k: str(v) for k, v in DEFAULTS.items()}, **opts}
    region = o.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    try:
        return pafs.S3FileSystem(
            region=region or "us-east-1", endpoint_override=o.get("endpoint_override") or None,
            scheme=o.get("scheme") or "https", connect_timeout=float(o["connect_timeout"]),
            request_timeout=float(o["request_timeout"]), anonymous=_flag(o.get("anonymous", "")),
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=int(o["max_attempts"])),
            force_virtual_addressing=_flag(o.get("force_virtual_addressing", "")),
            allow_delayed_open=True)   # a small object is one PUT at close, not a multipart upload
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad URI option ({e})") from None
