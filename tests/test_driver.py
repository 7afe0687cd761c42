"""runtime/driver.py with issue 17's settings: n samples per row through a killed and resumed
run (exactly once per (id, sample_index)), the optional columns, a scoring-only job."""
from __future__ import annotations

import glob
import signal
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _job import job_args, run_inprocess, write_prompts
from _procs import start_inprocess, wait_for_parts

pytestmark = pytest.mark.slow   # jobs run in-process and in a killed subprocess

ROWS = 6
SAMPLED = ("generation.n=4", "generation.temperature=0.9", "generation.logprobs=2",
           "generation.max_new_tokens=4", "data.shard_rows=4", "engine.max_num_seqs=8")


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt(dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("in") / "prompts.parquet", ROWS)


def _rows(out: Path) -> list[dict]:
    return [r for f in sorted(glob.glob(str(out / "part-*.parquet")))
            for r in pq.read_table(f).to_pylist()]


def test_n_samples_resume_exactly_once_per_pair(ckpt, data, tmp_path):
    ref_out = tmp_path / "ref"
    run_inprocess(job_args(ckpt, data, ref_out, *SAMPLED))
    ref = {(r["id"], r["sample_index"]): r for r in _rows(ref_out)}
    assert sorted(ref) == [(i, s) for i in range(ROWS) for s in range(4)]
    schema = pq.read_schema(glob.glob(str(ref_out / "part-*.parquet"))[0])
    assert schema.names[-3:] == ["sample_index", "token_logprobs", "top_logprobs"]
    assert schema.field("sample_index").type == pa.int32()
    for r in ref.values():
        assert len(r["token_logprobs"]) == len(r["top_logprobs"]) == r["completion_tokens"]
        assert all(len(p) == 2 and p[0]["logprob"] >= p[1]["logprob"] for p in r["top_logprobs"])

    out = tmp_path / "out"
    proc = start_inprocess(job_args(ckpt, data, out, *SAMPLED))
    wait_for_parts(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = Counter((r["id"], r["sample_index"]) for r in _rows(out))
    assert 0 < len(before) < 4 * ROWS and max(before.values()) == 1, "kill mid-run"
    run_inprocess(job_args(ckpt, data, out, *SAMPLED))
    got = _rows(out)
    pairs = Counter((r["id"], r["sample_index"]) for r in got)
    assert set(pairs) == set(ref) and max(pairs.values()) == 1      # each pair exactly once
    for r in got:
        assert r["completion_token_ids"] == ref[(r["id"], r["sample_index"])]["completion_token_ids"]


def test_scoring_job_and_unchanged_default_schema(ckpt, data, tmp_path):
    run_inprocess(job_args(ckpt, data, tmp_path / "score", "generation.max_new_tokens=0",
                           "generation.prompt_logprobs=true"))
    rows = _rows(tmp_path / "score")
    assert len(rows) == ROWS
    for r in rows:
        assert r["completion"] == "" and r["finish_reason"] == "length"
        p = r["prompt_token_logprobs"]
        assert len(p) == r["prompt_tokens"] and p[0] is None and all(v < 0 for v in p[1:])
    assert "sample_index" not in rows[0] and "token_logprobs" not in rows[0]
    # the same directory with another generation setting is another job
    from internlm2_tp.errors import OutputDirError
    with pytest.raises(OutputDirError, match="output_columns"):
        run_inprocess(job_args(ckpt, data, tmp_path / "score", "generation.max_new_tokens=0"))


def test_each_override_column_changes_only_its_row(ckpt, tmp_path):
    """Eight rows with one prompt, greedy: each row sets one of the new override columns; every
    other row is the plain row's completion."""
    prompt = [1, 333, 444, 555, 666, 777]   # inside the stand-in tokenizer's 1000 ids too

    def table(**cols) -> Path:
        n = 8
        data = {"id": pa.array(range(n), pa.int64()),
                "prompt_token_ids": pa.array([prompt] * n, pa.list_(pa.int32()))}
        types = {"stop": pa.list_(pa.string()), "stop_token_ids": pa.list_(pa.int64()),
                 "repetition_penalty": pa.float64(), "ignore_eos": pa.bool_(), "n": pa.int64(),
                 "logprobs": pa.int64(), "temperature": pa.float64()}
        for name, at in cols.items():
            data[name] = pa.array([at.get(i) for i in range(n)], types[name])
        path = tmp_path / f"in{len(list(tmp_path.glob('in*')))}.parquet"
        pq.write_table(pa.table(data), path)
        return path

    run_inprocess(job_args(ckpt, table(), tmp_path / "base", "generation.max_new_tokens=6"))
    base = _rows(tmp_path / "base")[0]
    toks = base["completion_token_ids"]
    assert len(toks) == 6 and base["finish_reason"] == "length"
    inp = table(stop_token_ids={1: [toks[2]]}, stop={2: [base["completion"][-3:]]},
                repetition_penalty={3: 0.05}, logprobs={4: 1, 7: 0}, n={5: 2}, temperature={5: 1.0},
                ignore_eos={6: True})
    run_inprocess(job_args(ckpt, inp, tmp_path / "out", "generation.max_new_tokens=6",
                           "generation.repetition_penalty=1.0"))
    got = {(r["id"], r["sample_index"]): r for r in _rows(tmp_path / "out")}
    assert sorted(got) == sorted([(i, 0) for i in range(8)] + [(5, 1)])
    for (i, s), r in got.items():
        if i in (0, 6):   # no override; ignore_eos (the plain row meets no eos)
            assert r["completion_token_ids"] == toks and r["token_logprobs"] is None, i
    assert got[(1, 0)]["completion_token_ids"] == toks[:3] and got[(1, 0)]["finish_reason"] == "stop"
    assert got[(2, 0)]["finish_reason"] == "stop"
    text, stop = base["completion"], base["completion"][-3:]
    assert got[(2, 0)]["completion"] == text[:text.find(stop)]
    assert got[(3, 0)]["completion_token_ids"] != toks     # < 1: the prompt's tokens favoured
    r4 = got[(4, 0)]
    assert r4["completion_token_ids"] == toks and len(r4["token_logprobs"]) == 6
    assert [p[0]["token_id"] for p in r4["top_logprobs"]] == toks     # greedy: the top token
    r7 = got[(7, 0)]    # logprobs=0: the sampled tokens' only
    assert r7["completion_token_ids"] == toks and r7["top_logprobs"] is None
    assert r7["token_logprobs"] == r4["token_logprobs"]
    assert got[(5, 0)]["completion_token_ids"] != got[(5, 1)]["completion_token_ids"]


def test_fingerprint_of_a_default_job_is_unchanged(ckpt):
    """An output directory written before issue 17 still resumes: the new keys and the optional
    columns enter the fingerprint only when a job sets them."""
    from internlm2_tp.config import ModelConfig
    from internlm2_tp.job_config import load_job_config
    from internlm2_tp.runtime.driver import fingerprint

    mcfg = ModelConfig.from_dir(ckpt)
    plain = fingerprint(load_job_config(None, [f"model.path={ckpt}"]), mcfg)
    assert set(plain) == {"model", "generation", "data"}
    assert set(plain["generation"]) == {"max_new_tokens", "temperature", "top_p", "top_k",
                                        "repetition_penalty", "seed", "ignore_eos", "stop",
                                        "stop_token_ids"}
    cfg = load_job_config(None, [f"model.path={ckpt}", "generation.logprobs=0"])
    fp = fingerprint(cfg, mcfg, optional=("token_logprobs",))
    assert fp["generation"]["logprobs"] == 0 and fp["output_columns"] == ["token_logprobs"]
