"""The roofline of a benchmark run: the work it executes, the machine's limits measured in the
same run, and the fastest the run could possibly go on them.

Work (`RunWork`), counted per run from what was computed, not per output token:
  - every token put through the layers: prompt tokens after prefix-cache hits, and one token
    per decode step of each row (2 FLOPs per weight per token);
  - attention scores and values over the real context of each computed token (causal: the
    i-th new token of a row with c cached keys sees c + i + 1 keys; 4 * heads * head_dim FLOPs
    per key per layer);
  - the LM head only for the rows whose logits are computed (one per row per sampled token).
Bytes: every forward pass streams all matmul weights once (a run needs at least `new_tokens`
passes: each row's tokens come one after another), plus each computed token's keys and values
written and the context read by attention.

Bound: time >= max(FLOPs / matmul peak, bytes / streaming-read bandwidth) for the whole run
(an engine may overlap its compute-bound prefill with memory-bound decode steps, so summing
per-step maxima would not be a bound). `bound_tokens_per_s` is output tokens over that time.

GEMM ceiling: the same run's matmuls timed at their own shapes (`GemmRates`: the model's
weights against M rows, M = the run's rows for decode steps and its LM head, M = the prefill
budget for prompt tokens), with nothing else executed. Its time over the roofline's is the
largest share of the roofline that any engine calling this machine's GEMM library can reach.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from internlm2_tp.engine.work import RunWork


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    itemsize: int            # bytes per weight and per cached key/value element

    @classmethod
    def of(cls, cfg: Any, dtype: torch.dtype | str) -> Shape:
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return cls(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                   cfg.head_dim, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size,
                   dt.itemsize)

    @property
    def layer_matrices(self) -> list[tuple[int, int]]:
        """(out, in) of each matmul weight of one decoder layer: wqkv, wo, w1|w3, w2."""
        h, d, f = self.hidden, self.head_dim, self.intermediate
        return [((self.heads + 2 * self.kv_heads) * d, h), (h, self.heads * d), (2 * f, h), (h, f)]

    @property
    def layer_weights(self) -> int:
        """Matmul weights of one decoder layer."""
        return sum(o * i for o, i in self.layer_matrices)

    @property
    def weight_bytes(self) -> int:
        """What one forward pass streams: every matmul weight (the embedding is a lookup)."""
        return (self.layers * self.layer_weights + self.vocab * self.hidden) * self.itemsize

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.itemsize

    def weight_flops_per_output_token(self) -> float:
        """The old benchmark's count: matmul FLOPs of one generated token, nothing else."""
        return 2.0 * (self.layers * self.layer_weights + self.vocab * self.hidden)


def work_flops(w: RunWork, s: Shape) -> float:
    return (2.0 * s.layers * s.layer_weights * w.tokens
            + 4.0 * s.layers * s.heads * s.head_dim * w.attention_keys
            + 2.0 * s.vocab * s.hidden * w.logit_rows)


def work_bytes(w: RunWork, s: Shape) -> float:
    return float(w.forwards) * s.weight_bytes + (w.kv_read_tokens + w.tokens) * s.kv_bytes_per_token


def prefix_hits(prompts: Sequence[Sequence[int]], block_size: int) -> list[int]:
    """Prompt tokens each row takes from a prefix cache of full `block_size` blocks when rows
    run in order and every computed full block is cached (the last token is always computed)."""
    seen: set[tuple[int, ...]] = set()
    hits = []
    for p in prompts:
        blocks = [tuple(p[:(i + 1) * block_size]) for i in range(len(p) // block_size)]
        n = 0
        while n < (len(p) - 1) // block_size and blocks[n] in seen:
            n += 1
        hits.append(n * block_size)
        seen.update(blocks)
    return hits


def run_work(prompt_lens: Sequence[int], hits: Sequence[int], new_tokens: int) -> RunWork:
    """The work of a run whose rows each generate `new_tokens` tokens, with `hits[i]` prompt
    tokens of row i from the prefix cache, in the fewest forward passes (`new_tokens`)."""
    w = RunWork(forwards=new_tokens)
    for p, h in zip(prompt_lens, hits):
        q = p - h
        w.tokens += q + new_tokens - 1
        w.attention_keys += q * h + q * (q + 1) // 2
        w.kv_read_tokens += p
        for pos in range(p, p + new_tokens - 1):   # decode steps feed positions p .. p+N-2
            w.attention_keys += pos + 1
            w.kv_read_tokens += pos + 1
        w.logit_rows += new_tokens
    return w


@dataclass
class Machine:
    matmul_peak_gflops: float
    stream_read_gbs: float

    def bound(self, work: RunWork, shape: Shape, output_tokens: int) -> dict[str, Any]:
        flops, nbytes = work_flops(work, shape), work_bytes(work, shape)
        compute_s = flops / (self.matmul_peak_gflops * 1e9)
        memory_s = nbytes / (self.stream_read_gbs * 1e9)
        t = max(compute_s, memory_s)
        return {"flops": flops, "bytes": nbytes,
                "compute_s": compute_s, "memory_s": memory_s,
                "bound_by": "compute" if compute_s >= memory_s else "memory",
                "bound_tokens_per_s": output_tokens / t, "work": asdict(work)}


def _best_s(fn: Any, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak_gflops(dtype: torch.dtype = torch.bfloat16, sizes: Sequence[int] = (2048, 3072),
                       reps: int = 8) -> float:
    """The best square-matmul rate over a few sizes, in this process's threads."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = max(best, 2 * n ** 3 / _best_s(lambda: a @ b, reps) / 1e9)
    return best


def stream_read_gbs(nbytes: int, reps: int = 8) -> float:
    """Streaming-read bandwidth: the best pass of an fp32 sum over a buffer of `nbytes`
    (the size of what one forward pass streams, so caches help it as much as they help the
    engine)."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    return x.numel() * 4 / _best_s(lambda: x.sum(), reps) / 1e9


@dataclass
class GemmRates:
    """GFLOP/s of the model's matmuls at M rows: all decoder-layer weights, and the LM head."""
    layers: dict[int, float]
    head: dict[int, float]


def _gemm_rate(weights: list[torch.Tensor], m: int, reps: int) -> float:
    """The better of F.linear and of oneDNN's packed weight (ops.pack_linear_weight, which
    our engine uses), or for one vocab-sized weight of weight @ x^T (our bf16 LM head)."""
    from internlm2_tp.ops import linear, pack_linear_weight

    xs = [torch.randn(m, w.shape[1], dtype=w.dtype) for w in weights]
    flops = sum(2.0 * m * w.numel() for w in weights)
    ways = [lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, weights)]]
    if len(weights) == 1:
        ways.append(lambda: weights[0] @ xs[0].t())
    packed = [pack_linear_weight(w) for w in weights]
    if all(p is not None for p in packed):
        ways.append(lambda: [linear(x, w, p) for x, w, p in zip(xs, weights, packed)])
    return max(flops / _best_s(f, reps) / 1e9 for f in ways)


def gemm_rates(shape: Shape, dtype: torch.dtype, decode_rows: Sequence[int], prefill_rows: int,
               reps: int = 3) -> GemmRates:
    g = torch.Generator().manual_seed(0)
    layer = [torch.randn(o, i, generator=g).to(dtype) for o, i in shape.layer_matrices]
    head = [torch.randn(shape.vocab, shape.hidden, generator=g).to(dtype)]
    return GemmRates({m: _gemm_rate(layer, m, reps) for m in (*decode_rows, prefill_rows)},
                     {m: _gemm_rate(head, m, reps) for m in decode_rows})


def gemm_seconds(work: RunWork, shape: Shape, rates: GemmRates, rows: int, new_tokens: int,
                 prefill_rows: int) -> float:
    """The run's matmuls alone at the rates measured for their shapes: each row's decode
    tokens (new_tokens - 1) at M = rows, the other computed tokens (prompts) at M =
    prefill_rows, the LM head's rows at M = rows."""
    decode = min(work.tokens, rows * (new_tokens - 1))
    per_token = 2.0 * shape.layers * shape.layer_weights
    return (per_token * decode / rates.layers[rows] / 1e9
            + per_token * (work.tokens - decode) / rates.layers[prefill_rows] / 1e9
            + 2.0 * shape.vocab * shape.hidden * work.logit_rows / rates.head[rows] / 1e9)


def measure_machine(dtype: torch.dtype, weight_bytes: int) -> Machine:
    return Machine(matmul_peak_gflops(dtype), stream_read_gbs(weight_bytes))
