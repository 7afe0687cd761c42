"""llguidance against xgrammar on the InternLM2 vocabulary: the measurement behind the choice of
engine/grammar.py's library.

    python -m internlm2_tp.bench.grammar_libs [TOKENIZER.model] [rows=64,256] [steps=40]

For each library: the vocabulary's set-up, the compile time of each schema (first compile, no
cache), the mask time per decode step for a batch of rows that each walk a valid instance of the
extraction schema, and which JSON Schema features compile. xgrammar is optional (it is not a
dependency: install it by hand to compare); a library that does not import is reported as such.
Prints one JSON object.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

EXTRACT = {"type": "object", "additionalProperties": False,
           "required": ["title", "sentiment", "score", "tags", "author"],
           "properties": {
               "title": {"type": "string", "maxLength": 40},
               "sentiment": {"enum": ["positive", "negative", "neutral"]},
               "score": {"type": "integer", "minimum": 0, "maximum": 100},
               "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                        "maxItems": 4},
               "author": {"type": "object", "additionalProperties": False,
                          "required": ["name", "verified"],
                          "properties": {"name": {"type": "string"},
                                         "verified": {"type": "boolean"}}}}}

SCHEMAS: dict[str, dict] = {
    "flat": {"type": "object", "required": ["a", "b"], "additionalProperties": False,
             "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}},
    "extract": EXTRACT,
    "defs_ref": {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "number"}},
                                 "required": ["x"]}},
                 "type": "object", "properties": {"pts": {"type": "array",
                                                          "items": {"$ref": "#/$defs/p"}}},
                 "required": ["pts"]},
    "anyof_enum": {"type": "object", "required": ["v"],
                   "properties": {"v": {"anyOf": [{"type": "integer"}, {"enum": ["a", "b"]},
                                                  {"type": "null"}]}}},
}

FEATURES: dict[str, dict] = {
    "enum/const": {"enum": ["a", 1, None], "const": "a"},
    "string min/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format email": {"type": "string", "format": "email"},
    "format uuid": {"type": "string", "format": "uuid"},
    "integer minimum/maximum": {"type": "integer", "minimum": -5, "maximum": 500},
    "exclusiveMinimum (number)": {"type": "number", "exclusiveMinimum": 0},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "array min/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                           "maxItems": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}},
                        {"required": ["a"]}]},
    "$ref recursive": {"$defs": {"n": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}, "$ref": "#/$defs/n"},
    "additionalProperties schema": {"type": "object",
                                    "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x_": {"type": "string"}}},
    "min/maxProperties": {"type": "object", "minProperties": 1, "maxProperties": 2},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "if/then/else": {"if": {"type": "string"}, "then": {"maxLength": 3}, "else": {"type": "integer"}},
    "not": {"not": {"type": "string"}},
}


def instances(rows: int) -> list[str]:
    """A valid, compact instance of EXTRACT per row, each row's own values."""
    out = []
    for i in range(rows):
        doc = {"title": f"review {i} of the product", "sentiment": ["positive", "negative",
                                                                    "neutral"][i % 3],
               "score": i % 101, "tags": [f"t{i % 7}", "fast"][: 1 + i % 2],
               "author": {"name": f"user{i}", "verified": bool(i % 2)}}
        out.append(json.dumps(doc, separators=(",", ":")))
    return out


class _Lib:
    """A library's compile / matcher / batch-mask calls, the same shape for both."""
    name = ""
    setup_s = 0.0

    def compile(self, schema: dict) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matchers: list, out: Any) -> None: ...
    def accept(self, m: Any, tok: int) -> bool: ...
    def bitmask(self, rows: int) -> Any: ...


class _LLGuidance(_Lib):
    name = "llguidance"

    def __init__(self, tok: Any, eos: list[int]):
        import llguidance as llg
        import llguidance.torch as lt

        from internlm2_tp.engine.grammar import Grammars
        t0 = time.perf_counter()
        self.g = Grammars(tok, eos)
        self.setup_s = time.perf_counter() - t0
        self.llg, self.lt, self.ex = llg, lt, llg.LLExecutor()
        self.version = llg.__dict__.get("__version__") or _version("llguidance")

    def compile(self, schema: dict) -> Any:
        from internlm2_tp.engine.grammar import grammar_text
        m = self.llg.LLMatcher(self.g.tokenizer, grammar_text("json_schema", json.dumps(schema)),
                               log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def bitmask(self, rows: int) -> Any:
        return self.lt.allocate_token_bitmask(rows, self.g.vocab_size)

    def fill(self, matchers: list, out: Any) -> None:
        self.lt.fill_next_token_bitmask_par(self.ex, [(m, i) for i, m in enumerate(matchers)], out)

    def accept(self, m: Any, tok: int) -> bool:
        return m.consume_token(tok)


class _XGrammar(_Lib):
    name = "xgrammar"

    def __init__(self, tok: Any, eos: list[int]):
        import xgrammar as xgr

        from internlm2_tp.engine.grammar import token_bytes
        t0 = time.perf_counter()
        _, never = token_bytes(tok)
        never_set = set(never)
        vocab = ["" if i in never_set else tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_FALLBACK, vocab_size=tok.vocab_size,
                                 stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.setup_s = time.perf_counter() - t0
        self.xgr, self.vocab_size = xgr, tok.vocab_size
        self.batch = xgr.BatchGrammarMatcher()
        self.version = _version("xgrammar")

    def compile(self, schema: dict) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                 separators=(",", ":"))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, rows: int) -> Any:
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, matchers: list, out: Any) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, out)

    def accept(self, m: Any, tok: int) -> bool:
        return m.accept_token(tok)


def _version(dist: str) -> str:
    from importlib.metadata import version
    return version(dist)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def mask_ms(lib: _Lib, tok: Any, rows: int, steps: int) -> dict[str, float]:
    """Mean and worst ms per decode step of one batch mask (rows matchers, one schema), each
    row then taking its own instance's next token."""
    compiled = lib.compile(EXTRACT)
    paths = [tok.encode(t, add_bos=False) for t in instances(rows)]
    matchers = [lib.matcher(compiled) for _ in range(rows)]
    out = lib.bitmask(rows)
    times = []
    for step in range(steps):
        _, dt = _timed(lambda: lib.fill(matchers, out))
        times.append(dt * 1000)
        for m, p in zip(matchers, paths):
            if step < len(p) and not lib.accept(m, p[step]):
                raise RuntimeError(f"{lib.name} refused a token of a valid instance")
    return {"mean_ms": sum(times) / len(times), "max_ms": max(times)}


def measure(lib: _Lib, tok: Any, rows: list[int], steps: int) -> dict[str, Any]:
    res: dict[str, Any] = {"version": lib.version, "vocab_setup_s": round(lib.setup_s, 3)}
    res["compile_ms"] = {k: round(_timed(lambda s=s: lib.compile(s))[1] * 1000, 2)
                         for k, s in SCHEMAS.items()}
    res["mask_per_step"] = {r: {k: round(v, 3) for k, v in mask_ms(lib, tok, r, steps).items()}
                            for r in rows}
    unsupported = {}
    for name, schema in FEATURES.items():
        try:
            lib.compile(schema)
        except Exception as e:  # noqa: BLE001 - either library's own error types
            unsupported[name] = " ".join(str(e).split())[:120]
    res["features_compiled"] = f"{len(FEATURES) - len(unsupported)}/{len(FEATURES)}"
    res["unsupported"] = unsupported
    return res


def main(argv: list[str]) -> dict[str, Any]:
    from internlm2_tp.testing.tokenizer_files import find_default_tokenizer_model
    from internlm2_tp.tokenizer import Tokenizer
    from internlm2_tp.tokenizer_config import TokenizerConfig

    args = dict(a.split("=", 1) for a in argv if "=" in a)
    paths = [a for a in argv if "=" not in a]
    model = paths[0] if paths else find_default_tokenizer_model()
    if model is None:
        raise SystemExit("no tokenizer.model given and the real one is absent")
    tok = Tokenizer(model, TokenizerConfig())
    rows = [int(r) for r in args.get("rows", "64,256").split(",")]
    steps = int(args.get("steps", "40"))
    flags = set(open("/proc/cpuinfo").read().split())
    report: dict[str, Any] = {"tokenizer": str(model), "vocab": tok.vocab_size,
                              "cpu_flags": sorted(f for f in flags if f.startswith("avx") or
                                                  f.startswith("amx")), "libraries": {}}
    for cls in (_LLGuidance, _XGrammar):
        try:
            lib = cls(tok, [2, 92542])
        except ImportError as e:
            report["libraries"][cls.name] = f"not installed ({e})"
            continue
        report["libraries"][cls.name] = measure(lib, tok, rows, steps)
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
