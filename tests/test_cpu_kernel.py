"""The compiled CPU decode-attention kernel: the same numbers as fp32 attention over each row's
keys (fp32 to 1e-5, bf16 to its output rounding) for every head grouping, head size, block size
and context the model meets; shapes it does not take go the plain way; the build (ops/cbuild.py)
is cached, atomic and optional."""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import pytest
import torch

from internlm2_tp.attention import AttentionMetadata, TorchAttention
from internlm2_tp.attention import cpu_kernel
from internlm2_tp.attention.cpu_kernel import FLAGS, SOURCE, DecodeKernel
from internlm2_tp.ops import cbuild


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> DecodeKernel:
    lib = cbuild.build(SOURCE, tmp_path_factory.mktemp("kernels"), FLAGS)
    return DecodeKernel(ctypes.CDLL(str(lib)))


def paged(ctx: list[int], kvh: int, d: int, bs: int, dtype: torch.dtype, seed: int = 0):
    """Caches [blocks, bs, kvh, d] with each row's blocks scattered, and block tables."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // bs) for c in ctx]
    perm = torch.randperm(sum(need) + 2, generator=g)
    tables = torch.zeros(len(ctx), max(need), dtype=torch.long)
    b0 = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[b0:b0 + n]
        b0 += n
    cache = [torch.randn(sum(need) + 2, bs, kvh, d, generator=g).to(dtype) for _ in range(2)]
    return cache, tables


def reference(q: torch.Tensor, cache: list[torch.Tensor], tables: torch.Tensor,
              ctx: list[int], scale: float) -> torch.Tensor:
    """fp32 attention of each row's one query over its keys, read slot by slot."""
    bs, kvh, d = cache[0].shape[1:]
    out = []
    for i, c in enumerate(ctx):
        slots = [int(tables[i, p // bs]) * bs + p % bs for p in range(c)]
        keys, vals = (x.float().view(-1, kvh, d)[slots] for x in cache)         # [c, kvh, d]
        g = q.shape[1] // kvh
        qg = q[i].float().view(kvh, g, d)
        p = (torch.einsum("hgd,khd->hgk", qg, keys) * scale).softmax(-1)
        out.append(torch.einsum("hgk,khd->hgd", p, vals).reshape(-1))
    return torch.stack(out)


CASES = {  # (query heads, KV heads, head_dim, block size, contexts)
    "20b-tp2": (24, 4, 128, 16, [1, 15, 16, 17, 40, 300]),
    "7b": (32, 8, 128, 16, [5, 33, 64]),
    "1.8b-tp8": (2, 1, 128, 32, [1, 31, 32, 100]),
    "bench": (48, 8, 32, 16, [16, 70, 96]),
    "no-grouping": (4, 4, 64, 8, [3, 8, 9, 50]),
    "group-16": (16, 1, 16, 128, [1, 127, 128, 129, 500]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_matches_fp32_attention(kernel: DecodeKernel, case: str, dtype: torch.dtype,
                                       threads: int) -> None:
    heads, kvh, d, bs, ctx = CASES[case]
    cache, tables = paged(ctx, kvh, d, bs, dtype)
    q = torch.randn(len(ctx), heads, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert kernel.supports(cache[0], heads)
    out = torch.full((len(ctx), heads * d), float("nan"), dtype=dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert kernel.decode(q, (cache[0], cache[1]), tables, torch.tensor(ctx), out, d ** -0.5)
    finally:
        torch.set_num_threads(old)
    ref = reference(q, cache, tables, ctx, d ** -0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:   # within bf16's rounding of the fp32 result (8 bits of mantissa)
        err = (out.float() - ref).abs()
        assert (err <= ref.abs() * 2 ** -8 + 1e-5).all(), float(err.max())


def test_backend_sends_decode_rows_to_the_kernel(kernel: DecodeKernel) -> None:
    """A mixed step (decodes, a fresh prompt, a prompt after cached keys) through the backend
    with the kernel equals the plain backend; the plan leaves no decode chunk to the plain
    path."""
    seqs, bs, heads, kvh, d = [(40, 1), (3, 1), (0, 9), (20, 5)], 16, 8, 2, 32
    need = [-(-(c + n) // bs) for c, n in seqs]
    tables, b0, pos, slots = [], 1, [], []
    for (c, n), nb in zip(seqs, need):
        tables.append(list(range(b0, b0 + nb)))
        b0 += nb
        pos += range(c, c + n)
        slots += [tables[-1][p // bs] * bs + p % bs for p in range(c, c + n)]
    meta = AttentionMetadata.build(
        positions=pos, rope_lengths=[p + 1 for p in pos], slots=slots, block_tables=tables,
        context_lens=[c + n for c, n in seqs], query_lens=[n for _, n in seqs],
        logits_indices=None, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    t = len(pos)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (heads, kvh, kvh))
    base = [torch.randn(b0, bs, kvh, d, generator=g) for _ in range(2)]
    outs = []
    for backend in (TorchAttention(decode_kernel=kernel), TorchAttention()):
        kv = (base[0].clone(), base[1].clone())
        backend.prepare(meta, kv[0], heads)
        assert meta.plan.kernel == (backend.kernel is not None)
        assert (meta.plan.decode == []) == meta.plan.kernel
        outs.append(backend.forward(q, k, v, kv, meta, 0.2))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,heads", [((4, 16, 2, 24), 4), ((4, 16, 1, 64), 32),
                                         ((4, 512, 1, 64), 1)],
                         ids=["head_dim-24", "group-32", "block-512"])
def test_shapes_past_the_kernels_limits_go_the_plain_way(kernel: DecodeKernel,
                                                         shape: tuple, heads: int) -> None:
    cache = torch.zeros(shape)
    assert not kernel.supports(cache, heads)
    assert not kernel.supports(cache.half(), heads) and kernel.supports(torch.zeros(4, 16, 2, 64),
                                                                         4)


def test_build_is_cached_and_keyed_by_source_and_flags(tmp_path: Path) -> None:
    lib = cbuild.build(SOURCE, tmp_path, FLAGS)
    stamp = lib.stat().st_mtime_ns
    assert cbuild.build(SOURCE, tmp_path, FLAGS) == lib and lib.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]          # no temporary left
    other = cbuild.build(SOURCE, tmp_path)                               # other flags: apart
    assert other != lib and other.name.startswith("cpu_decode-")


def test_no_compiler_or_switched_off_means_the_plain_path(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    monkeypatch.setenv("INTERNLM2TP_CPU_KERNELS", "0")
    assert cpu_kernel.load() is None
    monkeypatch.setenv("INTERNLM2TP_CPU_KERNELS", "1")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cbuild, "_loaded", {})
    with caplog.at_level(logging.WARNING):
        assert cpu_kernel.load() is None
    assert "CPU kernel cpu_decode.c unavailable, using the plain path" in caplog.text
    assert "no-such-cc" in caplog.text


def test_an_unwritable_cache_falls_back_to_the_temp_dir(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """A cache folder that cannot be made (here a file stands in its way, which stops root as
    well) still gets the kernel: it is built under the temp dir instead."""
    import os

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(cbuild.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    lib = cbuild.build(SOURCE, extra=FLAGS)
    assert lib.parent == tmp_path / "tmp" / f"internlm2_tp-kernels-{os.getuid()}"
    assert lib.is_file()
