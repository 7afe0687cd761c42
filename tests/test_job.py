"""Issue 4: the batch job end to end, on a real local Ray cluster and under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _job import MSG, job_args, read_out, run_cli, run_inprocess, write_prompts
from conftest import ROOT

pytestmark = pytest.mark.slow   # the job under ray job submit and torchrun, and in-process jobs

CKPT = dict(dtype="float32")  # the default tiny spec: 48 q / 8 KV heads, the tokenizer's vocab


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(**CKPT)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("in") / "prompts.parquet", 24)


@pytest.fixture(scope="module")
def ray_tp2_out(ray_cluster, ckpt, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "out"
    cmd = ["ray", "job", "submit", "--address", ray_cluster, "--working-dir", str(ROOT), "--",
           "python", "jobs/batch_infer.py", *job_args(ckpt, data, out, "parallel.tp=2")]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    for _ in range(20):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
        # A fresh head's dashboard agent registers a few seconds after `ray start` returns;
        # until then the submission is refused (before anything runs), as Ray's message says.
        if "No available agent to submit job" not in p.stdout + p.stderr:
            break
        time.sleep(3)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_ray_job_submit(ray_tp2_out):
    rows = read_out(ray_tp2_out)
    assert sorted(rows) == list(range(24))
    assert all(r["finish_reason"] in ("stop", "length") and r["error"] is None for r in rows.values())
    manifest = json.loads((ray_tp2_out / "_manifest.json").read_text())
    assert manifest["rows_this_run"] == 24 and manifest["config"]["parallel"]["tp"] == 2


def test_torchrun_matches_ray(ray_tp2_out, ckpt, data, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(ROOT / "launch" / "torchrun_infer.py"), *job_args(ckpt, data, out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    ours, ray = read_out(out), read_out(ray_tp2_out)
    assert {k: r["completion_token_ids"] for k, r in ours.items()} == \
        {k: r["completion_token_ids"] for k, r in ray.items()}


def test_rerun_skips_done_rows(ckpt, data, tmp_path):
    out = tmp_path / "out"
    first = run_inprocess(job_args(ckpt, data, out))
    again = run_inprocess(job_args(ckpt, data, out))
    assert first["rows_this_run"] == 24 and again["rows_this_run"] == 0
    assert len(read_out(out)) == 24


def test_row_level_errors_do_not_stop_the_job(ckpt, tmp_path):
    rows = [  # (id, prompt, messages, token ids)
        (0, "fine", None, None),
        (1, None, None, None),                                   # no prompt form
        (2, "two", [{"role": "user", "content": "forms"}], None),  # two prompt forms
        (3, "", None, None),                                     # empty prompt
        (4, None, None, [1, 10**9]),                             # token id outside the vocab
        (5, None, None, list(range(1, 200))),                    # longer than max_model_len
        (6, None, [{"role": "user", "content": "你好"}], None),
        (7, None, None, [1, 5, 6]),
    ]
    data = tmp_path / "bad_rows.parquet"
    pq.write_table(pa.table({
        "id": pa.array([r[0] for r in rows], pa.int64()),
        "prompt": pa.array([r[1] for r in rows], pa.string()),
        "messages": pa.array([r[2] for r in rows], MSG),
        "prompt_token_ids": pa.array([r[3] for r in rows], pa.list_(pa.int64()))}), data)
    out = tmp_path / "out"
    m = run_inprocess(job_args(ckpt, data, out, "engine.max_model_len=128"))
    got = read_out(out)
    assert sorted(got) == list(range(8)) and m["errors"] == 5
    for rid in (1, 2, 3, 4, 5):
        assert got[rid]["finish_reason"] == "error" and f"{rid}" in got[rid]["error"], got[rid]
    assert "outside the vocabulary" in got[4]["error"] and "max_model_len" in got[5]["error"]
    for rid in (0, 6, 7):
        assert got[rid]["error"] is None and got[rid]["completion_tokens"] >= 1


def _other_job_dir(ckpt: Path, data: Path, tmp: Path) -> Path:
    out = tmp / "other"
    run_inprocess(job_args(ckpt, data, out, "generation.max_new_tokens=2"))
    return out


@pytest.mark.parametrize("case", ["missing_input", "no_prompt_column", "unknown_key",
                                  "wrong_type", "invalid_tp", "other_jobs_output"])
def test_bad_input_refused_before_model_loads(case, ckpt, data, tmp_path):
    out = tmp_path / "out"
    args = job_args(ckpt, data, out)
    expect = {"missing_input": "no such file or directory", "no_prompt_column": "prompt",
              "unknown_key": "generation.max_tokens", "wrong_type": "parallel.tp",
              "invalid_tp": "parallel.tp: tp=5", "other_jobs_output": "generation.max_new_tokens"}[case]
    if case == "missing_input":
        args[1] = f"data.input={tmp_path / 'nope.parquet'}"
    elif case == "no_prompt_column":
        pq.write_table(pa.table({"id": [1], "text": ["x"]}), tmp_path / "t.parquet")
        args[1] = f"data.input={tmp_path / 't.parquet'}"
    elif case == "unknown_key":
        args.append("generation.max_tokens=3")
    elif case == "wrong_type":
        args.append("parallel.tp=two")
    elif case == "invalid_tp":
        args.append("parallel.tp=5")
    else:
        out = _other_job_dir(ckpt, data, tmp_path)
        args[2] = f"data.output={out}"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    p = run_cli("jobs/batch_infer.py", args, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert expect in p.stderr, p.stderr[-2000:]
    assert "memory plan" not in p.stderr  # refused before any rank loaded a weight
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


@pytest.fixture(scope="module")
def llama_ckpt(ckpt, tmp_path_factory):
    from internlm2_tp.tools.convert import convert

    return convert("llama", ckpt, tmp_path_factory.mktemp("llama") / "ckpt", progress=False)


def test_llama_layout_job_matches_original_tp1(ckpt, llama_ckpt, data, tmp_path):
    """Issue 5: model.path may point at the converted Llama layout; outputs do not change."""
    run_inprocess(job_args(ckpt, data, tmp_path / "a"))
    run_inprocess(job_args(llama_ckpt, data, tmp_path / "b"))
    a, b = read_out(tmp_path / "a"), read_out(tmp_path / "b")
    assert len(a) == 24
    assert {k: r["completion_token_ids"] for k, r in a.items()} == \
        {k: r["completion_token_ids"] for k, r in b.items()}


def test_llama_layout_job_matches_original_tp2(ray_tp2_out, llama_ckpt, data, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(ROOT / "launch" / "torchrun_infer.py"),
                        *job_args(llama_ckpt, data, out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    ours, orig = read_out(out), read_out(ray_tp2_out)
    assert {k: r["completion_token_ids"] for k, r in ours.items()} == \
        {k: r["completion_token_ids"] for k, r in orig.items()}


def _rig_chain(ckpt: Path, chain: list[int]) -> None:
    """Make a checkpoint whose greedy continuation is known: every layer adds nothing (wo and
    w2 zeroed, so the last hidden state is the current token's embedding), and the output head
    maps the embedding of chain[i] to chain[i + 1] with a margin no random row can reach."""
    from safetensors.torch import load_file, save_file

    files = sorted(ckpt.glob("*.safetensors"))
    emb = next(load_file(f)["model.tok_embeddings.weight"] for f in files
               if "model.tok_embeddings.weight" in load_file(f))
    for f in files:
        sd = load_file(f)
        for name, t in sd.items():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                t.zero_()
            elif name == "model.norm.weight":
                t.fill_(1.0)
            elif name == "output.weight":
                for cur, nxt in zip(chain, chain[1:]):
                    t[nxt] += 10 * emb[cur]
        save_file(sd, str(f), metadata={"format": "pt"})


def test_im_end_ends_a_chat_completion(real_tokenizer, make_ckpt, tmp_path):
    """Issue 3: <|im_end|> (92542, from generation_config.json) stops a chat reply and is not
    in its text; the token ids keep it, as the model produced it."""
    import shutil

    from internlm2_tp.tokenizer import Tokenizer

    ckpt = shutil.copytree(make_ckpt(dtype="float32"), tmp_path / "rigged")
    tok = Tokenizer.from_dir(ckpt)
    msgs = [{"role": "user", "content": "Where is the Louvre?"}]
    prompt = tok.apply_chat_template(msgs)
    answer = tok.encode("Paris, of course", add_bos=False)
    _rig_chain(ckpt, [prompt[-1], *answer, 92542])
    data = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"id": [0], "messages": pa.array([msgs], MSG)}), data)
    run_inprocess(job_args(ckpt, data, tmp_path / "out", "generation.max_new_tokens=20"))
    row = read_out(tmp_path / "out")[0]
    assert row["completion_token_ids"] == [*answer, 92542]
    assert row["finish_reason"] == "stop" and row["completion"] == "Paris, of course"
    assert "<|im_end|>" not in row["completion"]
