"""The output directory (a directory or an object-store prefix): its layout, resuming from
the shards there, the job fingerprint that must match, the manifest written last.

Metadata names start with ``_`` and temp names with ``.``, which every Parquet reader skips, so
the directory opens as one dataset (``pandas.read_parquet(out)``,
``pyarrow.parquet.read_table(out)``, Ray Data, Spark)::

    _job.json                             fingerprint of the job that owns the directory
                                          (``job.json`` before: still resumed, renamed on the fly)
    part-<run-id>-<seq:05d>.parquet       completed shards (appear whole under this name)
    .<final-name>.<hex>.tmp               in-flight temp files (removed at the next start)
    _manifest.json                        written last, when the job finished
"""
from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from internlm2_tp.errors import OutputDirError, StorageError
from internlm2_tp.runtime.data import storage
from internlm2_tp.runtime.data.storage import Location

JOB_FILE = "_job.json"
LEGACY_JOB_FILE = "job.json"
MANIFEST_FILE = "_manifest.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PART = re.compile(r"^part-([A-Za-z0-9_-]{1,64})-(\d{5,})\.parquet$")
_TEMP = re.compile(r"^\.(part-[A-Za-z0-9_-]{1,64}-\d{5,}\.parquet|_?job\.json|_manifest\.json|probe)"
                   r"\.[0-9a-f]+\.tmp$")
_W = "data.output"


def as_location(out: Location | str | os.PathLike) -> Location:
    return out if isinstance(out, Location) else storage.resolve(os.fspath(out), _W)


def _write_json(loc: Location, obj: dict) -> None:
    try:
        data = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"{loc.uri}: content is not JSON-serialisable: {e}") from e
    storage.write_atomic(loc, data, _W)


def fingerprint_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (nested) fingerprint dicts."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "<root>"]
    out: list[str] = []
    for k in sorted(set(old) | set(new), key=str):
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in old or k not in new:
            out.append(key)
        else:
            out.extend(fingerprint_diff(old[k], new[k], key))
    return out


def _scan(out: Location) -> tuple[list[str], list[str], list[str], set[str]]:
    """(part paths sorted, our temp paths, foreign names, our metadata names present)."""
    parts, temps, foreign, meta = [], [], [], set()
    for e in storage.listdir(out, _W):
        name, is_file = e.base_name, e.type == pafs.FileType.File
        if is_file and _PART.match(name):
            parts.append(e.path)
        elif is_file and _TEMP.match(name):
            temps.append(e.path)
        elif is_file and name in (JOB_FILE, LEGACY_JOB_FILE, MANIFEST_FILE):
            meta.add(name)
        else:
            foreign.append(name)
    return sorted(parts), temps, sorted(foreign), meta


def _read_ids(out: Location, path: str, with_samples: bool = False) -> pa.Array:
    """The part file's ids; with_samples: a struct array of (id, sample_index), the latter 0
    in a file without that column."""
    try:
        with out.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            has = with_samples and "sample_index" in pf.schema_arrow.names
            t = pf.read(columns=["id", "sample_index"] if has else ["id"])
        ids = t.column(0).combine_chunks()
        if not with_samples:
            return ids
        index = (t.column(1).combine_chunks() if has else pa.array([0] * len(ids), pa.int32()))
        return pa.StructArray.from_arrays([ids, index], ["id", "sample_index"])
    except Exception as e:  # noqa: BLE001
        raise OutputDirError(f"{out.show(path)}: cannot read the id column of this part file ({e}); delete "
                             "it to redo its rows") from e


def read_output_ids(out: Location | str | os.PathLike, with_samples: bool = False
                    ) -> pa.Array | None:
    """Ids already written (id column of every part file), or None when there are none. With
    `with_samples` (a job with n samples per row): (id, sample_index) structs, each pair once."""
    out = as_location(out)
    if out.has_dirs and storage.info(out, _W).type != pafs.FileType.Directory:
        return None
    parts = _scan(out)[0]
    with ThreadPoolExecutor(max_workers=8) as pool:   # one round trip each on an object store
        chunks = list(pool.map(lambda p: _read_ids(out, p, with_samples), parts))
    for p, c in zip(parts, chunks):
        if c.type != chunks[0].type:
            raise OutputDirError(f"{out.show(p)}: id type {c.type} differs from {chunks[0].type} in "
                                 f"{out.show(parts[0])}")
    if not chunks:
        return None
    ids = pa.concat_arrays(chunks)
    key = ids if not with_samples else pc.binary_join_element_wise(
        pc.cast(ids.field("id"), pa.string()), pc.cast(ids.field("sample_index"), pa.string()),
        "\x00")
    counts = pc.value_counts(key)
    dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(dup):
        if with_samples:
            pairs = [tuple(d.split("\x00")) for d in dup[:5].to_pylist()]
            raise OutputDirError(f"(id, sample_index) pairs {pairs} appear more than once "
                                 f"across the part files of {out.uri}")
        holders = [out.show(p) for p, c in zip(parts, chunks) if pc.any(pc.is_in(c, value_set=dup)).as_py()]
        raise OutputDirError(f"ids {dup[:5].to_pylist()} appear more than once across part files {holders}")
    return ids


def _fingerprint_problem(out: Location, meta: set[str], parts: list[str], want: dict) -> str | None:
    """Why the directory cannot be resumed by this job, or None."""
    name = JOB_FILE if JOB_FILE in meta else LEGACY_JOB_FILE if LEGACY_JOB_FILE in meta else None
    if name is None:
        if parts or MANIFEST_FILE in meta:
            return f"{out.uri} holds output without {JOB_FILE}, so it cannot be matched to this job"
        return None
    try:
        have = json.loads(storage.read_bytes(out.child(name), _W))["fingerprint"]
    except (StorageError, ValueError, KeyError, TypeError) as e:
        return f"{out.child(name).uri} is unreadable ({e})"
    diff = fingerprint_diff(have, want)
    return f"{out.uri} holds output of a different job; fingerprint keys differ: {diff}" if diff else None


def prepare_output_dir(out: Location | str | os.PathLike, fingerprint: dict, overwrite: bool,
                       with_samples: bool = False) -> pa.Array | None:
    """Create/validate the output directory for this job; return the ids already done (or None;
    `with_samples`: the (id, sample_index) pairs, as read_output_ids).
    Refusals come before anything is written; then a probe write and delete proves the
    permissions the run needs, before any weight is loaded."""
    if not isinstance(fingerprint, dict):
        raise TypeError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    try:
        want = json.loads(json.dumps(fingerprint, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"fingerprint is not JSON-serialisable: {e}") from e
    out = as_location(out)
    if not out.is_local:
        storage.check_reachable(out, _W)
    if storage.info(out, _W).type == pafs.FileType.File:
        raise OutputDirError(f"output path {out.uri} exists and is not a directory")
    if out.has_dirs:
        try:
            out.fs.create_dir(out.path, recursive=True)
        except storage.STORE_ERRORS as e:
            raise storage.fail(out, _W, "cannot create", e) from None
    parts, temps, foreign, meta = _scan(out)
    if foreign:
        raise OutputDirError(f"output directory {out.uri} contains files that this job did not write: "
                             f"{foreign[:5]}{' ...' if len(foreign) > 5 else ''}; use an empty or dedicated "
                             "directory (foreign files are never deleted, even with overwrite)")
    problem = _fingerprint_problem(out, meta, parts, want)
    if problem and not overwrite:
        raise OutputDirError(problem + "; set overwrite to discard it, or choose another output directory")
    storage.probe_write(out, _W)
    for t in temps:
        storage.delete(out, t, _W)
    doomed = [*parts, *(out.child(n).path for n in meta)] if problem else \
        [out.child(n).path for n in meta if n == MANIFEST_FILE]   # present only after a finished run
    for p in doomed:
        storage.delete(out, p, _W)
    if problem or JOB_FILE not in meta:
        legacy = LEGACY_JOB_FILE in meta and not problem
        job = (json.loads(storage.read_bytes(out.child(LEGACY_JOB_FILE), _W)) if legacy else
               {"format": "internlm2_tp.output/1", "fingerprint": want,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        _write_json(out.child(JOB_FILE), job)
        if legacy:   # renamed, so that every Parquet reader skips it
            storage.delete(out, out.child(LEGACY_JOB_FILE).path, _W)
    return read_output_ids(out, with_samples)


def write_manifest(out: Location | str | os.PathLike, manifest: dict) -> None:
    """Write ``_manifest.json`` whole (call last, after every shard is closed)."""
    if not isinstance(manifest, dict):
        raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
    _write_json(as_location(out).child(MANIFEST_FILE), manifest)


def head_rows(out: Location | str | os.PathLike, n: int) -> list[dict]:
    """The first n rows of the output's shards (read through the same filesystem layer)."""
    out = as_location(out)
    parts = _scan(out)[0] if storage.info(out, _W).type == pafs.FileType.Directory else []
    return ds.dataset(parts, filesystem=out.fs, format="parquet").head(n).to_pylist() if parts else []
