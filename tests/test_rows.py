"""runtime/data/rows.py: an input row -> the engine's request (or the error row that replaces it), and
a finished request -> its output row."""
from __future__ import annotations

from pathlib import Path

import pytest

from internlm2_tp.engine.params import SamplingParams
from internlm2_tp.runtime.data.input_types import InputRow
from internlm2_tp.runtime.data.output import OutputRow
from internlm2_tp.runtime.data.rows import Request, finished_row, row_seed, to_request
from internlm2_tp.testing.tokenizer_files import write_tokenizer_files
from internlm2_tp.tokenizer import Tokenizer

BASE = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, seed=11)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The real tokenizer when present, else the stand-in (both are what jobs read)."""
    d: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    return Tokenizer.from_dir(d)


def row(rid, prompt=None, messages=None, token_ids=None, overrides=None, error=None) -> InputRow:
    return InputRow(rid, prompt, messages, token_ids, overrides or {}, error)


def test_each_prompt_form_becomes_its_token_ids(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "你好"}]
    cases = [(row(1, prompt="The capital of France is"), tok.encode("The capital of France is")),
             (row(2, messages=msgs), tok.apply_chat_template(msgs)),
             (row(3, token_ids=[1, 5, 9]), [1, 5, 9])]
    for r, ids in cases:
        req = to_request(r, tok, BASE, tok.vocab_size)
        assert isinstance(req, Request) and req.row_id == r.id and req.prompt_ids == ids
        assert req.params == SamplingParams(**{**BASE.__dict__, "seed": row_seed(11, r.id)})


def test_row_seeds_are_stable_and_tell_ids_apart() -> None:
    assert row_seed(0, 7) == row_seed(0, 7) != row_seed(1, 7)
    assert row_seed(0, 7) != row_seed(0, "7")      # an int id and a string id are different rows
    assert -(1 << 63) <= row_seed(5, "x") < (1 << 63)


def test_a_rows_own_values_override_the_jobs(tok: Tokenizer) -> None:
    r = row(4, prompt="hi", overrides={"max_new_tokens": 3, "top_k": 5, "seed": -9})
    req = to_request(r, tok, BASE, tok.vocab_size)
    assert isinstance(req, Request)
    assert (req.params.max_new_tokens, req.params.top_k, req.params.seed) == (3, 5, -9)
    assert (req.params.temperature, req.params.top_p) == (0.7, 0.9)   # the job's


def test_bad_rows_become_error_rows_naming_them(tok: Tokenizer) -> None:
    (out,) = to_request(row(5, error="row id 5: column 'prompt' is an empty string"), tok, BASE,
                        tok.vocab_size)
    assert isinstance(out, OutputRow) and out.finish_reason == "error"
    assert out.error == "row id 5: column 'prompt' is an empty string" and out.prompt_tokens == 0
    (far,) = to_request(row("x", token_ids=[1, tok.vocab_size]), tok, BASE, tok.vocab_size)
    assert isinstance(far, OutputRow) and far.prompt_tokens == 2
    assert far.error == (f"row id 'x': token id {tok.vocab_size} is outside the vocabulary "
                         f"[0, {tok.vocab_size})")


def test_finished_rows_are_decoded_and_cut_at_their_stop_string(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world. The end", add_bos=False)
    plain = finished_row(6, 3, ids, "length", None, tok, (2,))
    assert plain.completion == "Hello world. The end" and plain.completion_tokens == len(ids)
    assert plain.prompt_tokens == 3 and plain.error is None
    cut = finished_row(7, 3, ids, "stop", " The", tok, (2,))
    assert cut.completion == "Hello world." and cut.finish_reason == "stop"
    eos = finished_row(8, 3, [*ids, tok.eos_id], "stop", None, tok, (tok.eos_id,))
    assert eos.completion == "Hello world. The end"             # specials never show


def test_every_new_override_changes_only_its_row(tok: Tokenizer) -> None:
    """repetition_penalty, stop, stop_token_ids, ignore_eos, n and logprobs from a row's columns:
    that row's request carries them, its neighbour keeps the job's."""
    own = {"repetition_penalty": 1.3, "stop": ("END",), "stop_token_ids": (7, 9),
           "ignore_eos": True, "n": 3, "logprobs": 4}
    for name, value in own.items():
        a = to_request(row(1, prompt="hi", overrides={name: value}), tok, BASE, tok.vocab_size)
        b = to_request(row(2, prompt="hi"), tok, BASE, tok.vocab_size)
        assert getattr(a.params, name) == value and getattr(b.params, name) == getattr(BASE, name)
        assert a.params == SamplingParams(**{**BASE.__dict__, "seed": row_seed(11, 1), name: value})
    assert to_request(row(1, prompt="hi", overrides={"n": 3}), tok, BASE,
                      tok.vocab_size).samples == (0, 1, 2)


def test_samples_already_written_are_not_asked_again(tok: Tokenizer) -> None:
    job = SamplingParams(**{**BASE.__dict__, "n": 4})
    req = to_request(row(1, prompt="hi"), tok, job, tok.vocab_size, done={0, 2})
    assert req.samples == (1, 3)
    assert to_request(row(1, prompt="hi"), tok, job, tok.vocab_size, done={0, 1, 2, 3}).samples == ()
    errs = to_request(row(9, error="row id 9: bad"), tok, job, tok.vocab_size, done={1})
    assert [e.sample_index for e in errs] == [0, 2, 3]


def test_greedy_with_n_samples_is_refused_naming_the_row(tok: Tokenizer) -> None:
    greedy = SamplingParams(max_new_tokens=4)
    errs = to_request(row("g", prompt="hi", overrides={"n": 2}), tok, greedy, tok.vocab_size)
    assert len(errs) == 2 and all(e.finish_reason == "error" for e in errs)
    assert errs[0].error.startswith("row id 'g': n=2 needs temperature > 0")


def test_finished_rows_carry_sample_index_and_logprobs(tok: Tokenizer) -> None:
    r = finished_row(3, 2, [5, 6], "length", None, tok, (2,), sample_index=2,
                     token_logprobs=[-0.5, -1.0], top_logprobs=[[(5, -0.5)], [(4, -0.9)]],
                     prompt_token_logprobs=[None, -2.0])
    assert r.sample_index == 2 and r.token_logprobs == [-0.5, -1.0]
    assert r.top_logprobs == [[{"token_id": 5, "logprob": -0.5}], [{"token_id": 4, "logprob": -0.9}]]
    with pytest.raises(ValueError, match="prompt_token_logprobs must have one entry"):
        finished_row(3, 3, [5], "length", None, tok, (2,), prompt_token_logprobs=[None, -2.0])


def test_a_rows_constraint_replaces_the_jobs_and_is_checked(tok: Tokenizer) -> None:
    """Issue 24: a row's json_schema / regex / choice column replaces the job's constraint; a
    row whose constraint does not compile, or that sets two, is an error row naming the
    column(s); the others keep the job's."""
    job = SamplingParams(max_new_tokens=16, regex="[0-9]+")
    plain = to_request(row(1, prompt="a"), tok, job, tok.vocab_size)
    assert plain.params.constraint == ("regex", "[0-9]+")
    own = to_request(row(2, prompt="a", overrides={"choice": ("yes", "no")}), tok, job,
                     tok.vocab_size)
    assert own.params.constraint == ("choice", ("yes", "no")) and own.params.regex == ""
    bad = to_request(row(3, prompt="a", overrides={"json_schema": '{"type": "object", "not": {}}'}),
                     tok, job, tok.vocab_size)
    assert bad[0].finish_reason == "error" and "row id 3" in bad[0].error
    assert "column 'json_schema'" in bad[0].error and "not" in bad[0].error
    two = to_request(row(4, prompt="a", overrides={"regex": "x", "choice": ("y",)}), tok, job,
                     tok.vocab_size)
    assert "columns ['regex', 'choice'] are set together" in two[0].error
