"""Reward models (InternLM2ForRewardModel): config, prompts, scores against a reference written
from the published math (tests/reference.py, not our model) at tp 1, 2 and 4, and the job."""
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

from _job import MSG, job_args, read_out, run_inprocess, run_job
from conftest import ROOT
from internlm2_tp.config import ModelConfig, with_task
from internlm2_tp.errors import ConfigError

SPEC = dict(dtype="float32", reward=True)
CONV = [{"role": "user", "content": "Write a haiku about caches."},
        {"role": "assistant", "content": "Blocks of keys and values\nshared by every prefix\n"}]


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(**SPEC)


@pytest.fixture(scope="module")
def tok(ckpt):
    from internlm2_tp.tokenizer import Tokenizer
    return Tokenizer.from_dir(ckpt)


@pytest.fixture(scope="module")
def ref(ckpt):
    from reference import raw_state_dict, ref_reward
    sd, c = raw_state_dict(ckpt), json.loads((ckpt / "config.json").read_text())
    return lambda ids: ref_reward(sd, c, ids)


def _conv_ids(tok, conv: list[dict], reward_id: int) -> list[int]:
    """The published recipe written out by hand: the chat template's text without the
    generation prompt, tokenized without added tokens, then the reward token."""
    text = "<s>" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)
    return tok.encode(text, add_bos=False) + [reward_id]


def test_config_recognises_reward_models(ckpt):
    cfg = ModelConfig.from_dir(ckpt)
    assert cfg.task == "reward" and cfg.layout == "internlm2" and cfg.reward_token_id is not None
    assert with_task(cfg, "auto") is cfg and with_task(cfg, "reward") is cfg
    with pytest.raises(ConfigError, match="model.task=generate.*reward model"):
        with_task(cfg, "generate")
    raw = json.loads((ckpt / "config.json").read_text())
    raw.pop("reward_token_id")
    with pytest.raises(ConfigError, match="reward_token_id"):
        ModelConfig.from_dict(raw)
    raw["architectures"] = ["InternLM2ForCausalLM"]
    causal = ModelConfig.from_dict(raw)
    assert causal.task == "generate"
    with pytest.raises(ConfigError, match="reward_token_id"):   # task=reward needs the token
        with_task(causal, "reward")
    assert with_task(ModelConfig.from_dict({**raw, "reward_token_id": 7}), "reward").task == "reward"


def test_prompt_ids_of_the_three_forms(tok, ckpt):
    from internlm2_tp.runtime.data.input_types import InputRow
    from internlm2_tp.runtime.data.rows import prompt_ids

    rid = ModelConfig.from_dir(ckpt).reward_token_id

    def row(**kw):
        base = dict(prompt=None, messages=None, token_ids=None)
        return InputRow(id=0, overrides={}, error=None, **{**base, **kw})
    assert prompt_ids(row(messages=CONV), tok, rid) == _conv_ids(tok, CONV, rid)
    assert prompt_ids(row(messages=CONV), tok)[-3:] != _conv_ids(tok, CONV, rid)[-3:]  # generate
    assert prompt_ids(row(prompt="hello there"), tok, rid) == tok.encode("hello there") + [rid]
    assert prompt_ids(row(token_ids=[1, 5, 6]), tok, rid) == [1, 5, 6, rid]
    assert prompt_ids(row(token_ids=[1, 5, rid]), tok, rid) == [1, 5, rid]   # already ends so
    assert prompt_ids(row(token_ids=[]), tok, rid) == []        # empty stays empty: an error row


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_rewards_match_reference_at_every_tp(tp, ckpt, tok, ref):
    """Long conversations go through chunked prefill (32 tokens a step) and the prefix cache
    (two rows share a conversation's start); every score within 1e-3 of the reference."""
    from _mp import run_ranks
    from _ranks import rank_finished
    from internlm2_tp.engine.params import SamplingParams

    rid = ModelConfig.from_dir(ckpt).reward_token_id
    long = [CONV[0], {"role": "assistant", "content": " ".join(f"w{i}" for i in range(60))}]
    seqs = [_conv_ids(tok, CONV, rid), _conv_ids(tok, long, rid), [1, 300, 301, 302, rid],
            _conv_ids(tok, CONV + [{"role": "user", "content": "Again?"}], rid)]
    reqs = [(i, s, SamplingParams(max_new_tokens=0)) for i, s in enumerate(seqs)]
    kw = dict(block_size=16, num_kv_blocks=64, max_num_batched_tokens=32)
    [(done, stats)] = run_ranks(rank_finished, tp, str(ckpt), [(reqs, None, kw)])[0]
    got = {f.request_id: f for f in done}
    assert max(len(s) for s in seqs) > 2 * 32 and stats["prefix_hits"] > 0
    for i, s in enumerate(seqs):
        f = got[i]
        assert f.output_ids == [] and f.finish_reason == "length" and f.prompt_tokens == len(s)
        assert abs(f.reward - ref(s)) < 1e-3, (tp, i, f.reward, ref(s))


def _reward_input(path: Path, tok, rid: int) -> tuple[Path, dict]:
    """Rows of every form, an error row, a carried column; and each good row's prompt ids."""
    rows = [(0, None, CONV, None), (1, "A plain prompt", None, None),
            (2, None, None, [1, 400, 401, rid]), (3, None, None, [1, 10**9]),
            (4, None, [CONV[0]], None), (5, None, None, [1, 500, 501])]
    pq.write_table(pa.table({
        "id": pa.array([r[0] for r in rows], pa.int64()),
        "prompt": pa.array([r[1] for r in rows], pa.string()),
        "messages": pa.array([r[2] for r in rows], MSG),
        "prompt_token_ids": pa.array([r[3] for r in rows], pa.list_(pa.int64())),
        "source": pa.array([f"s{r[0]}" for r in rows])}), path)
    want = {0: _conv_ids(tok, CONV, rid), 1: tok.encode("A plain prompt") + [rid],
            2: [1, 400, 401, rid], 4: _conv_ids(tok, [CONV[0]], rid), 5: [1, 500, 501, rid]}
    return path, want


def _check_rewards(out: Path, want: dict, ref) -> None:
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    assert schema.field("reward").type == pa.float32() and schema.names[-1] == "source"
    got = read_out(out)
    assert sorted(got) == list(range(6))
    assert got[3]["finish_reason"] == "error" and got[3]["reward"] is None
    assert "outside the vocabulary" in got[3]["error"]
    for i, ids in want.items():
        r = got[i]
        assert r["error"] is None and r["completion_token_ids"] == [] and r["source"] == f"s{i}"
        assert r["prompt_tokens"] == len(ids) and abs(r["reward"] - ref(ids)) < 1e-3, (i, r)


@pytest.mark.slow
def test_reward_job_resumes_and_carries(ckpt, tok, ref, tmp_path):
    rid = ModelConfig.from_dir(ckpt).reward_token_id
    data, want = _reward_input(tmp_path / "in.parquet", tok, rid)
    out = tmp_path / "out"
    args = job_args(ckpt, data, out, "data.carry_columns=[source]", "data.shard_rows=2")
    first = run_inprocess(args)
    assert first["rows_this_run"] == 6 and first["errors"] == 1
    shards = sorted(out.glob("part-*.parquet"))
    shards[-1].unlink()                                  # lose a shard: the rerun redoes it
    again = run_inprocess(args)
    assert again["rows_this_run"] == 2
    _check_rewards(out, want, ref)


@pytest.mark.parametrize("extra, expect", [
    (["generation.temperature=0.7"], "generation.temperature: a reward model"),
    (["generation.n=2", "generation.temperature=1"], "generation.temperature, generation.n"),
    (["generation.logprobs=0"], "generation.logprobs"),
    (["model.task=generate"], "model.task=generate"),
])
def test_reward_job_refuses_generation_settings(extra, expect, ckpt, tok, tmp_path, capsys):
    data, _ = _reward_input(tmp_path / "in.parquet", tok, 7)
    rc, err = run_job(job_args(ckpt, data, tmp_path / "out", *extra), capsys)
    assert rc == 2 and expect in err, err


def test_reward_job_refuses_override_columns_and_a_causal_lm(ckpt, make_ckpt, tmp_path, capsys):
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [0], "prompt": ["x"], "temperature": [0.5]}), data)
    rc, err = run_job(job_args(ckpt, data, tmp_path / "out"), capsys)
    assert rc == 2 and "input column 'temperature'" in err, err
    pq.write_table(pa.table({"id": [0], "prompt": ["x"]}), data)
    causal = make_ckpt(dtype="float32", extra={"reward_token_id": 7})
    rc, err = run_job(job_args(causal, data, tmp_path / "out2", "model.task=reward"), capsys)
    assert rc == 2 and "v_head.weight" in err, err


@pytest.mark.slow
def test_reward_job_under_ray_and_torchrun(ckpt, tok, ref, ray_cluster, tmp_path):
    rid = ModelConfig.from_dir(ckpt).reward_token_id
    data, want = _reward_input(tmp_path / "in.parquet", tok, rid)
    extra = ("parallel.tp=2", "data.carry_columns=[source]")
    out = tmp_path / "ray"
    cmd = ["ray", "job", "submit", "--address", ray_cluster, "--working-dir", str(ROOT), "--",
           "python", "jobs/batch_infer.py", *job_args(ckpt, data, out, *extra)]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    for _ in range(20):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
        if "No available agent to submit job" not in p.stdout + p.stderr:
            break
        time.sleep(3)   # a fresh head's dashboard agent registers a few seconds late
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _check_rewards(out, want, ref)
    out = tmp_path / "torchrun"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(ROOT / "launch" / "torchrun_infer.py"),
                        *job_args(ckpt, data, out, extra[1])],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    _check_rewards(out, want, ref)


@pytest.mark.slow
def test_reward_job_from_and_to_object_storage(ckpt, tok, ref, s3, tmp_path, capsys):
    """S3 in, S3 out (a real S3-compatible server on loopback), the manifest's metrics too."""
    rid = ModelConfig.from_dir(ckpt).reward_token_id
    local, want = _reward_input(tmp_path / "in.parquet", tok, rid)
    data = s3.put("in/rows.parquet", local.read_bytes())
    args = [a for a in job_args(ckpt, local, tmp_path / "x", "data.carry_columns=[source]")
            if not a.startswith(("data.input=", "data.output="))]
    rc, err = run_job(args + [f"data.input={data}", f"data.output={s3.uri('out')}"], capsys)
    assert rc == 0, err
    got = s3.read_out("out")
    assert sorted(got) == list(range(6)) and got[3]["reward"] is None
    for i, ids in want.items():
        assert abs(got[i]["reward"] - ref(ids)) < 1e-3 and got[i]["source"] == f"s{i}"
    manifest = json.loads(s3.loc("out/_manifest.json").fs.open_input_stream(
        s3.loc("out/_manifest.json").path).read())
    group = manifest["groups"][0]   # the out-of-vocabulary row never reached the group
    assert manifest["rows_this_run"] == 6 and group["rows"] == 5 and group["tokens"] == 0
    assert group["prompt_tokens"] == sum(len(v) for v in want.values())
