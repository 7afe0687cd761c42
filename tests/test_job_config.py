"""The command-line contract: OmegaConf dotlist overrides on conf/batch_infer.yaml."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from internlm2_tp.job_config import JobConfig, JobConfigError, load_job_config

YAML = ROOT / "conf" / "batch_infer.yaml"


def test_yaml_matches_schema_defaults():
    assert load_job_config(YAML, []) == JobConfig()


def test_overrides_apply():
    cfg = load_job_config(YAML, ["model.path=/m", "parallel.tp=4", "parallel.replicas=2",
                                 "generation.stop=[END,'###']", "engine.block_size=16",
                                 "data.overwrite=true", "generation.temperature=0.7"])
    assert (cfg.model.path, cfg.parallel.tp, cfg.parallel.replicas) == ("/m", 4, 2)
    assert cfg.generation.stop == ["END", "###"] and cfg.engine.block_size == 16
    assert cfg.data.overwrite is True and cfg.generation.temperature == 0.7


@pytest.mark.parametrize("override,culprit", [
    ("model.pth=/x", "model.pth"),
    ("nonsense=1", "nonsense"),
    ("parallel.tp=two", "parallel.tp"),
    ("generation.max_new_tokens=1.5", "generation.max_new_tokens"),
    ("data.overwrite=maybe", "data.overwrite"),
    ("engine.block_sizes=3", "engine.block_sizes"),
    ("model.dtype=int8", "model.dtype"),
    ("parallel.device=tpu", "parallel.device"),
    ("parallel.tp=0", "parallel.tp"),
    ("generation.temperature=-1", "temperature"),
    ("generation.top_p=0", "top_p"),
    ("engine.max_num_seqs=0", "engine.max_num_seqs"),
    ("parallel.hccl_connect_timeout=5", "parallel.hccl_connect_timeout"),
    ("justakey", "justakey"),
    ("generation.stop=['']", "generation.stop"),
    ("generation.stop_token_ids=[-1]", "generation.stop_token_ids"),
    ("engine.kv_cache_gb=-1", "engine.kv_cache_gb"),
    ("generation.n=4", "generation.n=4 needs temperature > 0"),
    ("generation.n=0", "generation.n"),
    ("generation.logprobs=65", "generation.logprobs"),
    ("generation.prompt_logprobs=maybe", "generation.prompt_logprobs"),
    ("generation.max_new_tokens=-1", "generation.max_new_tokens"),
])
def test_bad_override_names_key(override, culprit):
    with pytest.raises(JobConfigError, match=culprit.replace(".", r"\.")):
        load_job_config(YAML, [override])


@pytest.mark.parametrize("override,says", [
    ("generation.json_schema='{\"type\": \"array\", \"uniqueItems\": true}'",
     "generation.json_schema does not compile: Unimplemented keys: [\"uniqueItems\"]"),
    ("generation.json_schema='{\"type\": '", "generation.json_schema does not compile: not valid JSON"),
    ("generation.json_schema=missing.json", "neither inline JSON"),
    ("generation.regex='\"a[\"'", "generation.regex does not compile: .*unclosed character class"),
    ("generation.choice=['']", "generation.choice must hold distinct non-empty strings"),
])
def test_a_bad_constraint_stops_the_job_naming_the_key(override, says):
    with pytest.raises(JobConfigError, match=says.replace("[", r"\[").replace("]", r"\]")):
        load_job_config(YAML, [override])


def test_constraint_keys(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}}')
    cfg = load_job_config(YAML, [f"generation.json_schema={schema}"])
    assert cfg.generation.sampling_params().json_schema == schema.read_text()
    # Quoted: YAML reads a bare yes / no as a boolean (OmegaConf then makes it "True").
    assert load_job_config(YAML, ["generation.choice=['yes','no']"]).generation.sampling_params(
        ).constraint == ("choice", ("yes", "no"))
    with pytest.raises(JobConfigError, match="generation: regex and choice are both set"):
        load_job_config(YAML, ["generation.choice=[yes,no]", "generation.regex=x"])


def test_loading_the_config_imports_no_torch():
    """The job's settings are read and checked before anything heavy: no torch, no model."""
    code = ("import sys; from internlm2_tp.job_config import load_job_config; "
            f"load_job_config({str(YAML)!r}, ['generation.temperature=0.5', 'parallel.tp=2']); "
            "print(sorted(m for m in ('torch', 'ray', 'pyarrow', 'internlm2_tp.model') "
            "if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
