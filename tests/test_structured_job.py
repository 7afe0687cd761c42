"""Issue 24 end to end: structured output through the job: the job's generation.json_schema
file, rows with their own json_schema / regex / choice columns, a row's bad constraint failing
only that row, a bad job-level schema stopping the job (exit 2) before any load, tp 1 in-process
against tp 2 on a real Ray cluster, and a SIGKILLed run resumed to the same rows."""
from __future__ import annotations

import json
import re
import signal

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _job import job_args, read_out, run_cli, run_inprocess
from _procs import start_inprocess, wait_for_parts

pytestmark = pytest.mark.slow   # jobs in-process, on Ray, and a killed subprocess

JOB_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["label", "score"],
              "properties": {"label": {"enum": ["good", "bad"]},
                             "score": {"type": "integer", "minimum": 0, "maximum": 9}}}
ROW_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "string", "maxLength": 6}}}
REGEX = r"[A-Z]{3}-[0-9]{2}"
CHOICE = ["oui", "non"]
ROWS = 10


def _write(path):
    """Rows 0-5 cycle job schema / own schema / regex / choice / job schema / sampled job
    schema; row 6 a bad schema, row 7 two constraints; rows 8-9 the job schema."""
    schema = [None, json.dumps(ROW_SCHEMA), None, None, None, None, '{"type": "object", "not": {}}',
              None, None, None]
    regex = [None, None, REGEX, None, None, None, None, REGEX, None, None]
    choice = [None, None, None, CHOICE, None, None, None, CHOICE, None, None]
    temp = [None] * 5 + [0.8] + [None] * 4
    pq.write_table(pa.table({
        "id": pa.array(range(ROWS), pa.int64()),
        "prompt": [f"Review {i}: the product works. Answer:" for i in range(ROWS)],
        "json_schema": pa.array(schema, pa.string()), "regex": pa.array(regex, pa.string()),
        "choice": pa.array(choice, pa.list_(pa.string())),
        "temperature": pa.array(temp, pa.float64())}), path)
    return path


@pytest.fixture(scope="module")
def ckpt(make_ckpt, real_tokenizer):
    return make_ckpt(dtype="float32", hidden_size=64, num_attention_heads=16,
                     num_key_value_heads=8, intermediate_size=128, num_hidden_layers=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("structured")
    (d / "job_schema.json").write_text(json.dumps(JOB_SCHEMA))
    return _write(d / "rows.parquet"), d / "job_schema.json"


def _args(ckpt, setup, out, *extra):
    data, schema = setup
    return job_args(ckpt, data, out, f"generation.json_schema={schema}",
                    "generation.max_new_tokens=40", "data.shard_rows=2", *extra)


@pytest.fixture(scope="module")
def tp1(ckpt, setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1") / "out"
    run_inprocess(_args(ckpt, setup, out))
    return read_out(out)


def test_every_row_conforms_or_fails_alone(tp1):
    assert sorted(tp1) == list(range(ROWS))
    for i, r in tp1.items():
        if i in (6, 7):
            assert r["finish_reason"] == "error" and r["completion_token_ids"] == []
            assert ("column 'json_schema'" if i == 6 else "['regex', 'choice']") in r["error"]
            continue
        assert r["finish_reason"] == "stop" and r["error"] is None, r
        text = r["completion"]
        if i == 1:
            jsonschema.validate(json.loads(text), ROW_SCHEMA)
        elif i == 2:
            assert re.fullmatch(REGEX, text), text
        elif i == 3:
            assert text in CHOICE
        else:
            jsonschema.validate(json.loads(text), JOB_SCHEMA)


def test_tp2_on_ray_gives_the_same_tokens(tp1, ckpt, setup, ray_gcs, tmp_path):
    out = tmp_path / "out"
    p = run_cli("jobs/batch_infer.py", _args(ckpt, setup, out, "parallel.tp=2",
                                             f"ray.address={ray_gcs}"), timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    tp2 = read_out(out)
    assert {k: r["completion_token_ids"] for k, r in tp2.items()} == \
        {k: r["completion_token_ids"] for k, r in tp1.items()}


def test_killed_and_rerun_gives_the_same_rows(tp1, ckpt, setup, tmp_path):
    out = tmp_path / "out"
    proc = start_inprocess(_args(ckpt, setup, out, 'engine.max_num_seqs=2'))
    wait_for_parts(out, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(read_out(out)) < ROWS, "kill mid-run"
    run_inprocess(_args(ckpt, setup, out, "engine.max_num_seqs=2"))
    again = read_out(out)
    assert {k: (r["completion_token_ids"], r["finish_reason"]) for k, r in again.items()} == \
        {k: (r["completion_token_ids"], r["finish_reason"]) for k, r in tp1.items()}


def test_a_bad_job_schema_exits_2_before_loading(setup, tmp_path):
    data, _ = setup
    p = run_cli("jobs/batch_infer.py", [f"model.path={tmp_path / 'no-such-checkpoint'}",
                                        f"data.input={data}", f"data.output={tmp_path / 'o'}",
                                        "generation.json_schema='{\"type\": \"string\", "
                                        "\"format\": \"colour\"}'"], timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "generation.json_schema does not compile" in p.stderr and "colour" in p.stderr
    assert not (tmp_path / "o").exists()
