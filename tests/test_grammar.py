"""engine/grammar.py and engine/grammar_mask.py (issue 24): constraints compiled by llguidance
over the real InternLM2 vocabulary, the masks and their bits, and the engine's constrained rows
at tp 1, 2 and 4 (every completion parses and validates, matches, or is one of its choices)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from _mp import run_ranks
from _ranks import rank_generate
from internlm2_tp.engine.grammar import Grammars, constraint_error, token_bytes
from internlm2_tp.engine.grammar_mask import MaskFiller, apply, forbidden, forbidden_by_shifts
from internlm2_tp.engine.params import SamplingParams
from internlm2_tp.tokenizer import Tokenizer
from internlm2_tp.tokenizer_config import TokenizerConfig

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n", "tag"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tag": {"enum": ["red", "green", "蓝色"]}}}
SCHEMA_TEXT = json.dumps(SCHEMA)
REGEX = r"[a-f]{2,6}-[0-9]{1,3}"
CHOICE = ("yes", "no", "不确定")
EOS = (2, 92542)


@pytest.fixture(scope="module")
def tok(real_tokenizer) -> Tokenizer:
    return Tokenizer(real_tokenizer, TokenizerConfig())


@pytest.fixture(scope="module")
def grammars(tok) -> Grammars:
    return Grammars(tok, EOS)


def _bits(mask: torch.Tensor, vocab: int) -> set[int]:
    return {i for i in range(vocab) if (int(mask[i // 32]) >> (i % 32)) & 1}


def test_token_bytes_of_the_real_vocabulary(tok) -> None:
    pieces, never = token_bytes(tok)
    assert len(pieces) == tok.vocab_size == 92544
    assert pieces[tok.sp.piece_to_id("<0x41>")] == b"A"            # byte fallback: one byte
    assert pieces[tok.sp.piece_to_id("\u2581hello")] == b" hello"  # '▁' is a space
    # unk, bos, eos, the unused piece 354 (a NUL), and the 147 [UNUSED_TOKEN_n] placeholders
    # (the chat tokens among them) never come from text
    assert {0, 1, 2, 354, 92397, 92542, 92543}.issubset(never) and len(never) == 151


@pytest.mark.parametrize("kind, value, says", [
    ("json_schema", "{not json", "not valid JSON"),
    ("json_schema", "[1, 2]", "is a JSON object"),
    ("json_schema", json.dumps({"type": "array", "uniqueItems": True}), "uniqueItems"),
    ("regex", "a[", "unclosed character class"),
])
def test_a_bad_constraint_names_the_cause(kind, value, says) -> None:
    err = constraint_error(kind, value)
    assert err is not None and says in err and "\n" not in err


def test_good_constraints_compile() -> None:
    assert constraint_error("json_schema", SCHEMA_TEXT) is None
    assert constraint_error("regex", REGEX) is None
    assert constraint_error("choice", CHOICE) is None


def test_one_compile_per_distinct_constraint(grammars) -> None:
    before = grammars.compiled
    a, b = grammars.matcher("regex", "[0-9]+x"), grammars.matcher("regex", "[0-9]+x")
    assert grammars.compiled == before + 1 and a is not b       # one template, two matchers
    grammars.matcher("choice", ("p", "q"))
    assert grammars.compiled == before + 2
    with pytest.raises(ValueError, match="unclosed"):
        grammars.matcher("regex", "(")


def test_eos_is_allowed_only_where_the_grammar_may_end(grammars, tok) -> None:
    m = grammars.matcher("regex", "[0-9]{1,3}")
    fill = MaskFiller(grammars.vocab_size).fill
    first = _bits(fill([m])[0], grammars.vocab_size)
    assert not first & set(EOS) and tok.sp.piece_to_id("<0x31>") in first
    assert m.consume_token(tok.sp.piece_to_id("<0x31>"))           # "1": may end, or go on
    assert set(EOS) <= _bits(fill([m])[0], grammars.vocab_size) and not m.is_stopped()
    for t in tok.encode("23", add_bos=False):
        assert m.consume_token(t)
    assert m.is_stopped()                                            # "123": nothing can follow


def test_mask_bits_unpack_on_any_shard_boundary() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, rows = 301, 3
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, (vocab + 31) // 32), dtype=torch.int32,
                            generator=g)
    want = torch.tensor([[(int(bitmask[r, i // 32]) >> (i % 32)) & 1 for i in range(vocab)]
                         for r in range(rows)], dtype=torch.bool)
    for start, end in ((0, vocab), (13, 151), (151, 301), (7, 8)):
        assert torch.equal(forbidden(bitmask, start, end), ~want[:, start:end])   # host: numpy
        assert torch.equal(forbidden_by_shifts(bitmask, start, end), ~want[:, start:end])
    # A tp=2 rank's shard [151, 301) of 5 rows (padding column last); rows 1, 3 and 4 masked.
    local = torch.randn(5, 151)
    before = local.clone()
    apply(local, [1, 3, 4], bitmask, 151, 301, lambda t, d: t.to(d))
    ok = want[:, 151:301]
    for j, r in enumerate([1, 3, 4]):
        assert torch.equal(local[r, :150].isinf(), ~ok[j]) and local[r, 150] == before[r, 150]
    assert torch.equal(local[[0, 2]], before[[0, 2]])


# -- the engine ----------------------------------------------------------------------------------
TIGHT = dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=26)


def _requests(tok) -> list:
    kinds = [{"json_schema": SCHEMA_TEXT}, {"regex": REGEX}, {"choice": CHOICE}, {}]
    out = []
    for i in range(8):
        sampled = dict(temperature=0.9, top_k=50, seed=100 + i) if i % 2 else {}
        out.append((i, tok.encode(f"Row {i}: answer in the format asked. " * (1 + i % 3)),
                    SamplingParams(max_new_tokens=48 if kinds[i % 4] else 12, **sampled,
                                   **kinds[i % 4])))
    out.append((8, tok.encode("two samples"), SamplingParams(max_new_tokens=48, temperature=1.0,
                                                             n=2, json_schema=SCHEMA_TEXT)))
    return out


def _check(tok, requests, results) -> None:
    params = {rid: p for rid, _, p in requests}
    for rid, ids, reason in results:
        p, text = params[rid], tok.decode(ids)
        if p.json_schema:
            jsonschema.validate(json.loads(text), SCHEMA)
            assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
        elif p.regex:
            assert re.fullmatch(REGEX, text), text
        elif p.choice:
            assert text in CHOICE
        assert reason == ("stop" if p.constraint else reason), (rid, reason, text)


@pytest.fixture(scope="module")
def ckpt(make_ckpt, real_tokenizer):
    # The real tokenizer's vocab (92544) over a narrow model: the steps' cost is the vocab's.
    return make_ckpt(dtype="float32", hidden_size=64, num_attention_heads=16,
                     num_key_value_heads=8, intermediate_size=128, num_hidden_layers=1)


@pytest.mark.slow
def test_constrained_rows_conform_and_tp1_tp2_tp4_agree(ckpt, tok) -> None:
    """Greedy and seeded rows, n=2 samples, a cache small enough to preempt: every constrained
    completion conforms and ends with stop; tp 2 and tp 4 (each rank masking its own vocab
    shard) with a roomy cache (no preemption) give the same tokens."""
    reqs = _requests(tok)
    tight1, stats = run_ranks(rank_generate, 1, str(ckpt), reqs, TIGHT, torch.float32, True)[0]
    assert stats["preemptions"] > 0, "the small cache should have preempted a row"
    _check(tok, reqs, tight1)
    assert len({tuple(ids) for rid, ids, _ in tight1 if rid == 8}) == 2   # two samples differ
    roomy2, stats2 = run_ranks(rank_generate, 2, str(ckpt), reqs, {}, torch.float32, True)[0]
    assert stats2["preemptions"] == 0 and roomy2 == tight1
    roomy4, stats4 = run_ranks(rank_generate, 4, str(ckpt), reqs, {}, torch.float32, True)[0]
    assert stats4["preemptions"] == 0 and roomy4 == tight1


@pytest.mark.slow
def test_max_new_tokens_first_gives_length(ckpt, tok) -> None:
    reqs = [(0, tok.encode("cut short"), SamplingParams(max_new_tokens=3, json_schema=SCHEMA_TEXT))]
    (rid, ids, reason), = run_ranks(rank_generate, 1, str(ckpt), reqs, {}, torch.float32,
                                    True)[0][0]
    assert reason == "length" and len(ids) == 3 and tok.decode(ids).startswith('{"name":"')


@pytest.mark.slow
def test_logprobs_are_the_models_before_the_mask(ckpt, tok) -> None:
    """A constrained row's top log-probabilities at its first token are those of the same prompt
    unconstrained (the raw distribution), while its token is one the grammar allows."""
    from _ranks import build_model
    from internlm2_tp.engine.engine import Engine, EngineConfig
    from internlm2_tp.parallel.group import destroy_tp_group

    model = build_model(0, 1, 0, ckpt)
    try:
        eng = Engine(model, EngineConfig(), model.cfg.eos_token_id,
                     Tokenizer.from_dir(ckpt, chat_template="builtin"))
        prompt = tok.encode("Say yes or no:")
        free, fixed = eng.generate([
            (0, prompt, SamplingParams(max_new_tokens=2, logprobs=3)),
            (1, prompt, SamplingParams(max_new_tokens=8, logprobs=3, choice=("yes", "no")))])
        with pytest.raises(ValueError, match=r"row id 9: regex: .*unclosed group"):
            eng.add_request(9, prompt, SamplingParams(regex="("))   # the worker's error row
        assert not eng.has_work()
    finally:
        destroy_tp_group(model.tp)
    assert fixed.top_logprobs[0] == free.top_logprobs[0]
    assert tok.decode(fixed.output_ids) in ("yes", "no") and fixed.finish_reason == "stop"
    assert len(fixed.token_logprobs) == len(fixed.output_ids)


def test_the_compile_cache_is_bounded(grammars, monkeypatch) -> None:
    import internlm2_tp.engine.grammar as grammar
    monkeypatch.setattr(grammar, "MAX_TEMPLATES", 2)
    before = grammars.compiled
    for v in ("a", "b", "a", "c", "a"):      # "b" is the least recently used when "c" comes
        grammars.matcher("choice", (v,))
    grammars.matcher("choice", ("b",))
    assert grammars.compiled == before + 4 and len(grammars._templates) == 2
