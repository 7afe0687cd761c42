import math
import time

import pytest
import torch

from internlm2_tp.engine.params import SamplingParams
from internlm2_tp.engine.sampler import (BatchSamplingState, apply_repetition_penalty, hash_bits,
                                         hash_uniform, sample)

M64 = (1 << 64) - 1


def _mix_ref(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _hash_ref(seed, step):
    """Pure-Python (unsigned arithmetic) reference of sampler.hash_bits."""
    k = _mix_ref((seed + 0x9E3779B97F4A7C15) & M64)
    return _mix_ref(k ^ (((step + 1) * 0x9E3779B97F4A7C15) & M64))


def _draw(probs, params, n, seed_step0=0):
    """n draws from one row: a batch of n copies of the row with steps 0..n-1."""
    logits = torch.log(torch.tensor(probs, dtype=torch.float32)).expand(n, -1).contiguous()
    state = BatchSamplingState.build([params] * n)
    step = torch.arange(seed_step0, seed_step0 + n, dtype=torch.int64)
    return sample(logits, state, step)


def _check_freqs(tokens, expected, n):
    counts = torch.bincount(tokens, minlength=len(expected)).double() / n
    for i, p in enumerate(expected):
        if p == 0:
            assert counts[i] == 0, f"token {i} must never be sampled"
        else:
            sigma = math.sqrt(p * (1 - p) / n)
            assert abs(counts[i] - p) < 4 * sigma, (i, counts[i].item(), p)


# ---------------------------------------------------------------- greedy / penalty
def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    state = BatchSamplingState.build([SamplingParams()] * 6)
    assert state.all_greedy
    out = sample(logits, state, torch.zeros(6, dtype=torch.int64))
    assert torch.equal(out, logits.argmax(-1))


def test_repetition_penalty_matches_loop():
    torch.manual_seed(1)
    logits = torch.randn(3, 12) * 3
    prev = torch.tensor([[1, 4, 4, 7, -1, -1], [0, 11, 2, 3, 5, 6], [-1, -1, -1, -1, -1, -1]])
    pens = [1.3, 0.7, 2.0]
    ref = logits.clone()
    for b in range(3):
        for t in set(prev[b].tolist()) - {-1}:
            x = ref[b, t].item()
            ref[b, t] = x / pens[b] if x > 0 else x * pens[b]
    out = apply_repetition_penalty(logits, torch.tensor(pens), prev)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)  # ref divides in fp64
    state = BatchSamplingState.build([SamplingParams(repetition_penalty=p) for p in pens])
    assert torch.equal(sample(logits, state, torch.zeros(3, dtype=torch.int64), prev), ref.argmax(-1))
    with pytest.raises(ValueError, match="prev_token_ids"):
        sample(logits, state, torch.zeros(3, dtype=torch.int64))


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    state = BatchSamplingState.build([SamplingParams(repetition_penalty=1.2)])
    assert sample(logits, state, torch.zeros(1, dtype=torch.int64), torch.tensor([[0]])).item() == 1


def test_mixed_batch_greedy_rows_unaffected():
    torch.manual_seed(2)
    logits = torch.randn(4, 30)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.5, seed=3),
              SamplingParams(), SamplingParams(temperature=0.8, top_k=4, seed=4)]
    out = sample(logits, BatchSamplingState.build(params), torch.full((4,), 5, dtype=torch.int64))
    am = logits.argmax(-1)
    assert out[0] == am[0] and out[2] == am[2]


# ---------------------------------------------------------------- determinism
def test_row_independent_of_batch():
    torch.manual_seed(3)
    V = 1000
    row = torch.randn(V) * 2
    me = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=-12345)
    others = [SamplingParams(), SamplingParams(temperature=1.5, seed=7),
              SamplingParams(temperature=0.3, top_k=3, seed=8), SamplingParams(temperature=1.0, top_p=0.2),
              SamplingParams(repetition_penalty=1.1), SamplingParams(temperature=2.0, seed=9),
              SamplingParams(temperature=1.0, top_k=2000, seed=10)]
    plain = SamplingParams(temperature=1.1, seed=42)
    row[:40] = row[:40].round()  # ties, also at the top-k boundary
    only_k = SamplingParams(temperature=0.7, top_k=5, seed=99)  # alone: torch.topk path
    for target in (me, plain, only_k):
        alone = [sample(row[None], BatchSamplingState.build([target]),
                        torch.tensor([s])).item() for s in range(20)]
        for idx in (0, 5):
            params = others[:idx] + [target] + others[idx:]
            logits = torch.randn(8, V)
            logits[idx] = row
            prev = torch.randint(0, V, (8, 6))
            got = [sample(logits, BatchSamplingState.build(params),
                          torch.full((8,), s, dtype=torch.int64), prev)[idx].item() for s in range(20)]
            assert got == alone
        assert len(set(alone)) > 1


def test_seeds_give_different_streams():
    probs = [0.2] * 5
    a = _draw(probs, SamplingParams(temperature=1.0, seed=1), 200)
    b = _draw(probs, SamplingParams(temperature=1.0, seed=2), 200)
    c = _draw(probs, SamplingParams(temperature=1.0, seed=1), 200)
    assert torch.equal(a, c) and not torch.equal(a, b)


# ---------------------------------------------------------------- RNG
def test_hash_matches_python_reference():
    seeds = [0, 1, -1, 12345, -(1 << 63), (1 << 63) - 1, 0x7F0F0F0F0F0F0F0F]
    steps = [0, 1, 7, 1 << 40]
    for s in seeds:
        for t in steps:
            got = hash_bits(torch.tensor([s]), torch.tensor([t])).item() & M64
            assert got == _hash_ref(s & M64, t), (s, t)


@pytest.mark.parametrize("seed", [0, -987654321, (1 << 63) - 1, -(1 << 63)])
@pytest.mark.parametrize("bits", [24, 53])
def test_uniform_unbiased(seed, bits):
    n = 100_000
    u = hash_uniform(torch.full((n,), seed, dtype=torch.int64), torch.arange(n), bits=bits).double()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    hist = torch.histc(u, bins=10, min=0, max=1) / n
    assert (hist - 0.1).abs().max() < 4 * math.sqrt(0.09 / n)
    # birthday bound: about n^2 / 2^(bits+1) repeats are expected (~300 for 24 bits)
    expected_dups = n * n / 2 ** (bits + 1)
    assert n - u.unique().numel() < expected_dups + 5 * math.sqrt(expected_dups) + 5


# ---------------------------------------------------------------- statistics
PROBS = [0.4, 0.25, 0.2, 0.1, 0.05]
N = 20_000


def test_stats_temperature_one():
    _check_freqs(_draw(PROBS, SamplingParams(temperature=1.0, seed=11), N), PROBS, N)


def test_stats_temperature_half():
    w = torch.tensor(PROBS, dtype=torch.float64) ** 2
    exp = (w / w.sum()).tolist()
    _check_freqs(_draw(PROBS, SamplingParams(temperature=0.5, seed=12), N), exp, N)


def test_stats_top_k():
    exp = [0.4 / 0.65, 0.25 / 0.65, 0, 0, 0]
    _check_freqs(_draw(PROBS, SamplingParams(temperature=1.0, top_k=2, seed=13), N), exp, N)


def test_stats_top_p():
    # nucleus 0.7: 0.4 (<0.7 before) + 0.25 (0.4 before) + 0.2 (0.65 before) kept; 0.1 has 0.85 before
    exp = [0.4 / 0.85, 0.25 / 0.85, 0.2 / 0.85, 0, 0]
    _check_freqs(_draw(PROBS, SamplingParams(temperature=1.0, top_p=0.7, seed=14), N), exp, N)


def test_stats_top_k_then_top_p():
    # top_k=3 -> [0.4,0.25,0.2]/0.85 = [.47,.29,.235]; top_p=0.6 keeps the first two
    exp = [0.4 / 0.65, 0.25 / 0.65, 0, 0, 0]
    _check_freqs(_draw(PROBS, SamplingParams(temperature=1.0, top_k=3, top_p=0.6, seed=15), N), exp, N)


def test_stats_masked_vocab_never_sampled():
    probs = PROBS + [0.0, 0.0, 0.0]  # log(0) = -inf, like vocab padding
    for p in (SamplingParams(temperature=1.0, seed=16), SamplingParams(temperature=2.0, top_p=0.99, seed=17)):
        out = _draw(probs, p, N)
        assert out.max() < 5
    _check_freqs(_draw(probs, SamplingParams(temperature=1.0, seed=16), N), PROBS + [0, 0, 0], N)


# ---------------------------------------------------------------- edge cases
def test_edge_cases():
    torch.manual_seed(4)
    logits = torch.randn(4, 64)
    logits[:, 60:] = float("-inf")
    steps = torch.arange(4)
    am = logits.argmax(-1)
    tiny = BatchSamplingState.build([SamplingParams(temperature=1e-5, seed=i) for i in range(4)])
    assert torch.equal(sample(logits, tiny, steps), am)
    tiny_p = BatchSamplingState.build([SamplingParams(temperature=1e-5, top_p=0.5, top_k=3, seed=i) for i in range(4)])
    assert torch.equal(sample(logits, tiny_p, steps), am)
    big_k = BatchSamplingState.build([SamplingParams(temperature=1.0, top_k=10_000, seed=i) for i in range(4)])
    plain = BatchSamplingState.build([SamplingParams(temperature=1.0, seed=i) for i in range(4)])
    for s in range(10):
        a = sample(logits, big_k, steps + s)
        assert torch.equal(a, sample(logits, plain, steps + s))  # top_k > V == off
        assert (a < 60).all()
    k1 = BatchSamplingState.build([SamplingParams(temperature=3.0, top_k=1, seed=i) for i in range(4)])
    assert torch.equal(sample(logits, k1, steps), am)
    huge = torch.full((1, 8), 3e38)
    huge[0, 3] = float("-inf")
    out = sample(huge, BatchSamplingState.build([SamplingParams(temperature=0.5, top_p=0.9)]), torch.zeros(1, dtype=torch.int64))
    assert out.item() != 3


# ---------------------------------------------------------------- benchmark (printed only)
def test_microbenchmark(capsys):
    B, V = 64, 92544
    torch.manual_seed(5)
    logits = torch.randn(B, V) * 3
    step = torch.zeros(B, dtype=torch.int64)
    cases = {
        "greedy": [SamplingParams()] * B,
        "temperature": [SamplingParams(temperature=0.8, seed=i) for i in range(B)],
        "top_p": [SamplingParams(temperature=0.8, top_p=0.9, seed=i) for i in range(B)],
        "top_k": [SamplingParams(temperature=0.8, top_k=50, seed=i) for i in range(B)],
    }
    lines = []
    for name, params in cases.items():
        state = BatchSamplingState.build(params)
        sample(logits, state, step)
        t0 = time.perf_counter()
        reps = 2
        for _ in range(reps):
            sample(logits, state, step)
        lines.append(f"sampler B={B} V={V} {name}: {(time.perf_counter() - t0) / reps * 1e3:.1f} ms/step")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def _reference_threshold(row: torch.Tensor, top_k: int, top_p: float) -> float:
    """The textbook filter on one row: sort the whole vocab, cut at the k-th value (ties kept),
    then keep the shortest prefix whose mass before each kept token is below top_p."""
    ordered = torch.sort(row, descending=True).values
    if top_k:
        ordered = ordered[ordered >= ordered[top_k - 1]]
    if top_p >= 1:
        return float(ordered[-1]) if top_k else float("-inf")
    probs = torch.softmax(ordered.double(), dim=0)
    before = torch.cumsum(probs, 0) - probs
    return float(ordered[int((before < top_p).sum()) - 1])


def test_top_p_window_and_full_sort_agree_with_reference():
    """Top-p first looks at the best TOP_P_WINDOW logits; rows whose nucleus spills past them
    (flat rows) are sorted in full. Both paths keep exactly the reference's tokens."""
    from internlm2_tp.engine.sampler import TOP_P_WINDOW, _filter_threshold

    V = 4 * TOP_P_WINDOW + 37
    g = torch.Generator().manual_seed(11)
    flat = torch.randn(V, generator=g) * 0.5                  # nucleus spills past the window
    peaked = torch.randn(V, generator=g) * 3
    peaked[torch.randperm(V, generator=g)[:30]] += 12          # nucleus inside the window
    cases = [(peaked, 0, 0.9), (flat, 0, 0.9), (peaked, 50, 0.8), (flat, 7, 0.95),
             (flat, 0, 1.0), (peaked, 0, 0.3), (flat, 0, 0.999)]
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p, seed=i)
              for i, (_, k, p) in enumerate(cases)]
    scaled = torch.stack([r for r, _, _ in cases])
    scaled = scaled - scaled.max(dim=-1, keepdim=True).values
    thr = _filter_threshold(scaled.clone(), BatchSamplingState.build(params)).squeeze(1)
    for i, (_, k, p) in enumerate(cases):
        ref = _reference_threshold(scaled[i], k, p)
        kept, want = scaled[i] >= thr[i], scaled[i] >= ref
        assert torch.equal(kept, want), (i, k, p, int(kept.sum()), int(want.sum()))
    assert int((scaled[1] >= thr[1]).sum()) > TOP_P_WINDOW    # the fallback path was taken
    assert int((scaled[0] >= thr[0]).sum()) < 64              # the window path was enough
