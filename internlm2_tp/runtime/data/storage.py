"""Where data lives: a local path or a URI (``s3://``, ``gs://``, ``hdfs://``, ``file://``) as one
pyarrow filesystem and a path in it, and the few operations the job needs on any of them: list
with glob patterns, write a file so that it appears whole under its final name, probe that a
prefix is writable. Every store failure becomes a ``StorageError`` naming the URI and the store's
own message (exit code 2), never a traceback. S3-compatible stores: ``runtime.data.s3``; any other
scheme pyarrow knows (gs, hdfs, abfs) through ``pyarrow.fs.FileSystem.from_uri``.
"""
from __future__ import annotations

import fnmatch
import os
import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from internlm2_tp.errors import StorageError
from internlm2_tp.runtime.data.s3 import s3_filesystem

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MAGIC = re.compile(r"[*?[]")
STORE_ERRORS = (OSError, pa.ArrowException)   # what pyarrow raises for a store's refusal


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str           # the filesystem's path: an absolute local path, or bucket/key
    prefix: str = ""    # prepended to a path to show it: "" (local) or "s3://" ...

    @property
    def uri(self) -> str:
        return self.prefix + self.path

    def show(self, path: str) -> str:
        return self.prefix + path

    def child(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", self.prefix)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def has_dirs(self) -> bool:
        """Object stores have prefixes, not directories: nothing to create, no rename."""
        return self.fs.type_name not in ("s3", "gcs")


def has_magic(s: str) -> bool:
    return bool(_MAGIC.search(s))


def scheme_of(spec: str) -> str:
    m = _SCHEME.match(spec)
    return m.group(1).lower() if m else ""


def canonical(spec: str) -> str:
    """What identifies the data, not how it is reached: a URI without its query (endpoint
    options may move to the environment between runs); a local path as given."""
    return spec.split("?", 1)[0] if scheme_of(spec) else spec


def resolve(spec: str, what: str) -> Location:
    """A local path or URI as a Location; `what` names the setting in errors (data.input)."""
    if not isinstance(spec, str) or not spec.strip():
        raise StorageError(f"{what} must be a non-empty path or URI, got {spec!r}")
    scheme = scheme_of(spec)
    if not scheme:
        return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec)))
    if scheme == "file":
        return Location(pafs.LocalFileSystem(), os.path.abspath(urlsplit(spec).path))
    if scheme in ("s3", "s3a"):
        return _s3(spec, what)
    base, _, query = spec.partition("?")
    head, _, tail = _split_magic(base)
    try:
        fs, path = pafs.FileSystem.from_uri(head + ("?" + query if query else ""))
    except STORE_ERRORS as e:
        raise StorageError(f"{what} {spec}: {_one_line(e)}") from None
    return Location(fs, path.rstrip("/") + ("/" + tail if tail else ""), f"{scheme}://")


def _split_magic(uri: str) -> tuple[str, str, str]:
    """(literal head, "/", the rest from the first part with a glob character)."""
    parts = uri.split("/")
    i = next((k for k, p in enumerate(parts) if has_magic(p)), len(parts))
    return "/".join(parts[:i]), "/", "/".join(parts[i:])


def _s3(spec: str, what: str) -> Location:
    u = urlsplit(spec)
    if not u.netloc:
        raise StorageError(f"{what} {spec}: no bucket in the URI (s3://bucket/prefix)")
    try:
        fs = s3_filesystem(u.query)
    except ValueError as e:
        raise StorageError(f"{what} {canonical(spec)}: {e}") from None
    key = u.path.strip("/")
    return Location(fs, u.netloc + ("/" + key if key else ""), "s3://")


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if "No response body" in msg:   # HEAD requests carry no error text
        msg += " (a HEAD request: check the credentials, the bucket policy and AWS_REGION)"
    return msg


def fail(loc: Location, what: str, doing: str, e: BaseException) -> StorageError:
    return StorageError(f"{what} {loc.uri}: {doing}: {_one_line(e)}")


def check_reachable(loc: Location, what: str) -> None:
    """One cheap listing under the location (a request whose errors carry the store's text:
    unreachable endpoint, unknown key, bad signature), then, on an object store, that the
    bucket exists (a listing of a missing bucket is just empty)."""
    base = _split_magic(loc.path)[0] if has_magic(loc.path) else loc.path
    try:
        loc.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except NotADirectoryError:
        pass
    except STORE_ERRORS as e:
        raise fail(loc, what, "cannot list", e) from None
    if not loc.has_dirs:
        bucket = loc.path.split("/", 1)[0]
        try:
            missing = loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except STORE_ERRORS:
            missing = False   # HEAD on the bucket may be denied where listing is allowed
        if missing:
            raise StorageError(f"{what} {loc.uri}: bucket {bucket!r} does not exist")


def info(loc: Location, what: str) -> pafs.FileInfo:
    try:
        return loc.fs.get_file_info(loc.path)
    except STORE_ERRORS as e:
        raise fail(loc, what, "cannot stat", e) from None


def listdir(loc: Location, what: str, recursive: bool = False) -> list[pafs.FileInfo]:
    try:
        return loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True,
                                                      recursive=recursive))
    except STORE_ERRORS as e:
        raise fail(loc, what, "cannot list", e) from None


def glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Python glob's rules, part by part: ``**`` spans any number of parts, a leading dot is
    matched only by a pattern that starts with one."""
    if not pattern:
        return not parts
    if pattern[0] == "**":   # never through a hidden folder
        return any(glob_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    return (bool(parts) and not (parts[0].startswith(".") and not pattern[0].startswith("."))
            and fnmatch.fnmatchcase(parts[0], pattern[0]) and glob_match(pattern[1:], parts[1:]))


def hidden(parts: list[str]) -> bool:
    """Names every dataset reader skips (``_SUCCESS``, ``_job.json``, ``.tmp`` files)."""
    return any(p.startswith((".", "_")) for p in parts)


def glob(loc: Location, what: str) -> tuple[str, list[tuple[str, bool]]]:
    """(the literal base directory, [(path, is_dir)]) of the entries a glob pattern names."""
    base, _, rest = _split_magic(loc.path)
    pattern = rest.split("/")
    entries = listdir(Location(loc.fs, base, loc.prefix), what, recursive=True)
    out = []
    for e in entries:
        rel = e.path[len(base):].strip("/").split("/")
        if glob_match(pattern, rel):
            out.append((e.path, e.type == pafs.FileType.Directory))
    return base, out


def write_atomic(loc: Location, data: bytes, what: str) -> None:
    """``data`` appears under ``loc`` whole or not at all: written to a hidden temp name first
    (fsynced and renamed on a filesystem; uploaded, then copied server-side on an object store,
    whose copy creates the object atomically), the temp name removed on any failure."""
    tmp = loc.path.rsplit("/", 1)
    tmp_path = f"{tmp[0]}/.{tmp[1]}.{secrets.token_hex(6)}.tmp"
    if loc.is_local:
        _local_atomic(loc.path, tmp_path, data)
        return
    try:
        with loc.fs.open_output_stream(tmp_path) as f:
            f.write(data)
        loc.fs.move(tmp_path, loc.path)
    except BaseException as e:
        try:
            loc.fs.delete_file(tmp_path)
        except STORE_ERRORS:
            pass
        if isinstance(e, STORE_ERRORS):
            raise fail(loc, what, "cannot write", e) from None
        raise


def _local_atomic(final: str, tmp: str, data: bytes) -> None:
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        fd = os.open(os.path.dirname(final), os.O_RDONLY)
    except OSError:   # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def probe_write(loc: Location, what: str) -> None:
    """Write and delete a small hidden object under the prefix: a missing write or delete
    permission fails here, before any weight is loaded, not at the first shard."""
    probe = loc.child(f".probe.{secrets.token_hex(6)}.tmp")
    try:
        with loc.fs.open_output_stream(probe.path) as f:
            f.write(b"internlm2_tp write probe\n")
    except STORE_ERRORS as e:
        raise fail(loc, what, "cannot write (probe object)", e) from None
    try:
        loc.fs.delete_file(probe.path)
    except STORE_ERRORS as e:
        raise fail(loc, what, "cannot delete (probe object)", e) from None


def delete(loc: Location, path: str, what: str) -> None:
    try:
        loc.fs.delete_file(path)
    except FileNotFoundError:
        pass
    except STORE_ERRORS as e:
        raise fail(Location(loc.fs, path, loc.prefix), what, "cannot delete", e) from None


def read_bytes(loc: Location, what: str) -> bytes:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except STORE_ERRORS as e:
        raise fail(loc, what, "cannot read", e) from None
