"""Helpers for job-level tests: demo-style Parquet inputs, output readers, in-process runs."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import ROOT

MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
TEXTS = ["The capital of France is", "请用一句话介绍上海。", "Emoji 🙂 and ünïcödé",
         "def f(x):\n    return x", "一二三四五六七八九十", "KV caches, explained"]


def write_prompts(path: Path, n: int, start: int = 0) -> Path:
    """n rows cycling through text prompts, chat messages and token-id prompts."""
    ids, prompts, msgs, toks = [], [], [], []
    for i in range(start, start + n):
        ids.append(i)
        kind = i % 3
        prompts.append(f"{TEXTS[i % len(TEXTS)]} #{i}" if kind == 0 else None)
        msgs.append([{"role": "user", "content": f"{TEXTS[(i + 1) % len(TEXTS)]} ({i})"}]
                    if kind == 1 else None)
        toks.append([1, 100 + i % 50, 200 + i % 70, 300] if kind == 2 else None)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "prompt": pa.array(prompts, pa.string()),
                             "messages": pa.array(msgs, MSG),
                             "prompt_token_ids": pa.array(toks, pa.list_(pa.int32()))}), path)
    return path


def read_out(out: Path) -> dict:
    """id -> row; asserts every id appears once across all part files."""
    rows: dict = {}
    for f in sorted(glob.glob(str(Path(out) / "part-*.parquet"))):
        for r in pq.read_table(f).to_pylist():
            assert r["id"] not in rows, f"id {r['id']} written twice"
            rows[r["id"]] = r
    return rows


def job_args(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={ckpt}", f"data.input={data}", f"data.output={out}",
            "parallel.device=cpu", "model.dtype=float32", "generation.max_new_tokens=8",
            "engine.block_size=16", *extra]


def run_cli(script: str, args: list[str], timeout: float = 300, env_extra: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT, **kw)


def run_inprocess(args: list[str]) -> dict:
    """The job on one in-process rank (no Ray): the same Job and engine code path."""
    from internlm2_tp.job_config import load_job_config
    from internlm2_tp.runtime.driver import Job
    from internlm2_tp.runtime.cluster.torchrun_pool import TorchrunPool
    from internlm2_tp.runtime.worker import Worker, WorkerSpec

    cfg = load_job_config(ROOT / "conf" / "batch_infer.yaml", args)
    job = Job(cfg)
    return job.run(TorchrunPool(Worker(WorkerSpec.from_job(cfg, "cpu"))))


def run_job(args: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of the batch job's own error handling (`main_guard`) around an
    in-process run: the exit codes and messages of jobs/batch_infer.py, without Ray."""
    from internlm2_tp.cli import main_guard

    def main(argv: list[str]) -> int:
        run_inprocess(argv)
        return 0
    capsys.readouterr()
    rc = main_guard(main, args)
    return rc, capsys.readouterr().err
