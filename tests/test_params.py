"""engine/params.py: SamplingParams and the one table of its fields' rules, which the job's
settings, the input's columns and each row's values are all checked against."""
from __future__ import annotations

from dataclasses import fields

import pytest

from internlm2_tp.engine.params import (INTEGER, NUMBER, ROW_OVERRIDES, RULES, SamplingParams,
                                        rule_error, row_value, sample_seed)


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", -1), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("repetition_penalty", 0.0), ("seed", 1 << 63),
    ("stop_token_ids", (-3,)), ("stop", ("",)), ("temperature", float("nan")),
    ("max_new_tokens", 4.0), ("ignore_eos", 1), ("top_k", True),
    ("n", 0), ("logprobs", -2), ("logprobs", 65), ("prompt_logprobs", 1),
])
def test_params_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must"):
        SamplingParams(**{field: value})


def test_params_coerce_lists():
    p = SamplingParams(stop_token_ids=[5, 6], stop=["a"])
    assert p.stop_token_ids == (5, 6) and p.stop == ("a",)
    assert SamplingParams(stop="xy").stop == ("xy",)
    hash(p)


def test_every_field_has_one_rule_and_overrides_are_fields():
    assert set(RULES) == {f.name for f in fields(SamplingParams)}
    assert set(ROW_OVERRIDES) <= set(RULES)
    assert ROW_OVERRIDES == ("max_new_tokens", "temperature", "top_p", "top_k", "seed",
                             "repetition_penalty", "stop", "stop_token_ids", "ignore_eos", "n",
                             "logprobs", "json_schema", "regex", "choice")


def test_at_most_one_constraint():
    assert SamplingParams().constraint is None
    assert SamplingParams(choice=["a", "b"]).constraint == ("choice", ("a", "b"))
    assert SamplingParams(regex="x+").constraint == ("regex", "x+")
    with pytest.raises(ValueError, match="json_schema and regex are both set"):
        SamplingParams(json_schema="{}", regex="x")
    with pytest.raises(ValueError, match="SamplingParams.choice must hold distinct non-empty"):
        SamplingParams(choice=["a", "a"])


def test_scoring_only_and_samples():
    assert SamplingParams(max_new_tokens=0, prompt_logprobs=True).max_new_tokens == 0
    assert SamplingParams(n=4, temperature=0.7).n == 4
    with pytest.raises(ValueError, match="SamplingParams.n=4 needs temperature > 0"):
        SamplingParams(n=4)


def test_sample_seeds_depend_on_row_seed_and_index_only():
    assert sample_seed(123, 0) == 123      # sample 0 draws as a row with n=1
    seeds = {sample_seed(123, i) for i in range(64)}
    assert len(seeds) == 64 and sample_seed(123, 5) == sample_seed(123, 5)
    assert all(-(1 << 63) <= s < (1 << 63) for s in seeds)
    assert sample_seed(124, 5) != sample_seed(123, 5)


def test_a_rows_value_is_converted_then_checked():
    assert row_value("max_new_tokens", 4.0) == (4, None)          # a JSON 4.0 is an integer
    assert row_value("temperature", 1) == (1.0, None)
    assert row_value("seed", -5) == (-5, None)                    # any int64, as the job's seed
    assert row_value("seed", 1 << 63)[1] == "must be in the int64 range"
    assert row_value("top_k", -1)[1] == "must be >= 0 (0 disables top-k)"
    v, err = row_value("temperature", float("nan"))
    assert err == "must be finite and >= 0"


def test_kinds_of_json_values():
    assert INTEGER.json_accepts(4.0) and not INTEGER.json_accepts(4.5)
    assert not INTEGER.json_accepts(True) and not INTEGER.accepts(4.0)
    assert NUMBER.json_accepts(2) and not NUMBER.json_accepts("2") and not NUMBER.json_accepts(None)
    assert rule_error("stop", ("a", 3)) == "must be a list of strings"
    assert rule_error("stop_token_ids", [1, 2]) is None
