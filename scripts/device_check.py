#!/usr/bin/env python
"""One-command check of a device path against the CPU's plain fp32 path.

    python scripts/device_check.py                    # the device `auto` finds, tp=1
    python scripts/device_check.py --tp 2             # the forward on 2 ranks
    python scripts/device_check.py --emulate-npu      # the NPU platform on CPU, torch_npu stand-in

Rows of the table: each op (rms_norm, rotary, swiglu) and each kind of attention step (decode,
prefill, mixed, prefix continuation) on the platform against the CPU fp32 plain path; a tp=N
forward of a tiny InternLM2 (head_dim 128 like the real models) against the CPU fp32 tp=1
forward; a tiny job end to end (Parquet in, Parquet out; tp=1); a throughput line. Exit code 1
on any mismatch. --emulate-npu runs NpuPlatform on CPU tensors with
internlm2_tp/testing/fake_torch_npu.py (what tests/test_npu_emulated.py does).
"""
from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from internlm2_tp.attention import AttentionMetadata, TorchAttention, dense_metadata
from internlm2_tp.ops import TorchOps
from internlm2_tp.parallel.platform import CpuPlatform, NpuPlatform, Platform, get_platform

ROOT = Path(__file__).resolve().parents[1]   # the checkout: conf/

TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-4}
SPEC = dict(hidden_size=512, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=1024, num_hidden_layers=2, vocab_size=1000, dtype="float32")
SEQS = [[1, 5, 9, 200, 7] * 30, [1] + list(range(30, 170)), [1, 999, 3] * 10]
STEPS = {"decode": [(5, 1), (300, 1)], "prefill": [(0, 7), (0, 130)],
         "mixed": [(40, 1), (0, 9), (0, 17)], "prefix": [(40, 1), (128, 5), (150, 30)],
         # pieces merged by log-sum-exp: a decode row over 256 keys in several FIA calls (NPU),
         # a prefix read in 128-key tiles (plain path: CPU, CUDA, the NPU's fp32 fallback)
         "split (lse)": [(700, 1), (900, 64)]}


def make_platform(args: argparse.Namespace) -> Platform:
    if args.emulate_npu:
        from internlm2_tp.testing.fake_torch_npu import FakeTorchNpu
        return NpuPlatform(FakeTorchNpu(), emulate=True)
    return get_platform(args.device)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()


def check_ops(p: Platform, dev: torch.device, dtype: torch.dtype) -> list[tuple[str, float]]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    on = lambda *ts: [t.to(dev, dtype) for t in ts]  # noqa: E731
    ops, ref = p.ops(), TorchOps()
    x, w, gu = r(33, 512), 1 + 0.1 * r(512), r(33, 2048)
    q, k, ang = r(33, 8, 128), r(33, 2, 128), torch.rand(33, 64, generator=g) * 6
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = ops.rotary(*on(q, k, cos, sin))
    out = [("op rms_norm", rel_err(ops.rms_norm(*on(x, w), 1e-5), ref.rms_norm(x, w, 1e-5))),
           ("op rotary", max(rel_err(a, b) for a, b in zip(rot, ref.rotary(q, k, cos, sin)))),
           ("op swiglu", rel_err(ops.silu_and_mul(*on(gu)), ref.silu_and_mul(gu)))]
    for name, seqs in STEPS.items():
        out.append((f"attention {name}", attention_err(p, dev, dtype, seqs)))
    return out


def attention_step(seqs: list[tuple[int, int]], dtype: torch.dtype, dev: torch.device):
    g, bs = torch.Generator().manual_seed(1), 128
    need = [-(-(c + n) // bs) for c, n in seqs]
    perm = torch.randperm(sum(need) + 2, generator=g).tolist()
    tables = [perm[sum(need[:i]):sum(need[:i + 1])] for i in range(len(seqs))]
    pos = [p for c, n in seqs for p in range(c, c + n)]
    slots = [t[p // bs] * bs + p % bs for (c, n), t in zip(seqs, tables) for p in range(c, c + n)]
    meta = AttentionMetadata.build(
        positions=pos, rope_lengths=[p + 1 for p in pos], slots=slots, block_tables=tables,
        context_lens=[c + n for c, n in seqs], query_lens=[n for _, n in seqs],
        logits_indices=None, device=dev)
    tensors = [torch.randn(len(pos), h, 128, generator=g) for h in (8, 2, 2)]
    cache = [torch.randn(len(perm), bs, 2, 128, generator=g) for _ in range(2)]
    return meta, [t.to(dev, dtype) for t in tensors + cache], tensors + cache


def attention_err(p: Platform, dev: torch.device, dtype: torch.dtype,
                  seqs: list[tuple[int, int]]) -> float:
    meta, (q, k, v, kc, vc), ref = attention_step(seqs, dtype, dev)
    backend = p.attention()
    if seqs is STEPS["split (lse)"]:
        backend.max_keys = 256                       # NpuAttention's per-call decode keys
        plain_path = getattr(backend, "fallback", backend)
        plain_path.min_bytes, plain_path.fraction = 1, 0     # one block per tile
    backend.prepare(meta, kc, 8)
    got = backend.forward(q, k, v, (kc, vc), meta, 128 ** -0.5)
    ref_meta = attention_step(seqs, torch.float32, torch.device("cpu"))[0]
    plain = TorchAttention()
    plain.prepare(ref_meta, ref[3], 8)
    return rel_err(got, plain.forward(*ref[:3], (ref[3], ref[4]), ref_meta, 128 ** -0.5))


def prefill(model, seqs: list[list[int]]) -> torch.Tensor:
    lens, dev = [len(s) for s in seqs], model.device
    nb = sum(-(-n // 128) for n in lens)
    shape = (nb, 128, model.kv_heads_local, model.cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=model.dtype, device=dev),
           torch.zeros(shape, dtype=model.dtype, device=dev)) for _ in model.layers]
    ids = torch.tensor([t for s in seqs for t in s], device=dev)
    return model(ids, dense_metadata(lens, 128, dev, all_logits=True), kv).float().cpu()


def rank_forward(rank: int, world: int, port: int, args: argparse.Namespace, ckpt: str, q) -> None:
    try:
        from internlm2_tp.checkpoint import CheckpointReader
        from internlm2_tp.config import ModelConfig
        from internlm2_tp.model import InternLM2Model
        from internlm2_tp.parallel.group import destroy_tp_group, init_tp_group

        p = make_platform(args)
        dev = p.local_device(rank)
        tp = init_tp_group(p, rank, world, "127.0.0.1", port, timeout_s=300)
        model = InternLM2Model(ModelConfig.from_dir(ckpt), tp, getattr(torch, args.dtype), dev, p)
        model.load_weights(CheckpointReader(ckpt))
        out = prefill(model, SEQS)
        destroy_tp_group(tp)
        buf = io.BytesIO()
        torch.save(out, buf)
        q.put((rank, "ok", buf.getvalue() if rank == 0 else b""))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        q.put((rank, "error", traceback.format_exc()))


def check_forward(args: argparse.Namespace, ckpt: str) -> tuple[float, float]:
    """(relative error, argmax agreement) of the tp-way forward against CPU fp32 tp=1."""
    from internlm2_tp.checkpoint import CheckpointReader
    from internlm2_tp.config import ModelConfig
    from internlm2_tp.model import InternLM2Model
    from internlm2_tp.parallel.group import TPGroup, free_port

    ref_model = InternLM2Model(ModelConfig.from_dir(ckpt), TPGroup(), torch.float32,
                               torch.device("cpu"), CpuPlatform())
    ref_model.load_weights(CheckpointReader(ckpt))
    ref = prefill(ref_model, SEQS)
    ctx, port = mp.get_context("spawn"), free_port()
    q = ctx.Queue()
    procs = [ctx.Process(target=rank_forward, args=(r, args.tp, port, args, ckpt, q))
             for r in range(args.tp)]
    for proc in procs:
        proc.start()
    got = None
    for _ in procs:
        rank, status, value = q.get(timeout=600)
        if status == "error":
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        if rank == 0:
            got = torch.load(io.BytesIO(value))
    for proc in procs:
        proc.join(timeout=30)
    return rel_err(got, ref), (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


def check_job(p: Platform, args: argparse.Namespace, ckpt: str, work: Path) -> tuple[int, int]:
    """(rows written, rows with an error) of a tiny job on one rank of the platform."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from internlm2_tp.testing.demo import PROMPTS
    from internlm2_tp.job_config import load_job_config
    from internlm2_tp.runtime.driver import Job
    from internlm2_tp.runtime.cluster.torchrun_pool import TorchrunPool
    from internlm2_tp.runtime.worker import Worker, WorkerSpec

    work.mkdir()
    data, out = work / "prompts.parquet", work / "out"
    texts = (PROMPTS * 2)[:8]
    pq.write_table(pa.table({"id": list(range(8)), "prompt": texts}), data)
    cfg = load_job_config(ROOT / "conf" / "batch_infer.yaml", [
        f"model.path={ckpt}", f"data.input={data}", f"data.output={out}",
        f"model.dtype={args.dtype}", "generation.max_new_tokens=8",
        "engine.kv_cache_gb=0.25"])
    spec = WorkerSpec(model_path=ckpt, dtype=args.dtype, device=p.kind, tp=1, rank=0,
                      master_addr="127.0.0.1", master_port=0, engine=cfg.engine)
    manifest = Job(cfg).run(TorchrunPool(Worker(spec, p)))
    rows = sum(pq.read_metadata(f).num_rows for f in Path(out).glob("part-*.parquet"))
    return rows, int(manifest["errors"])


def throughput(p: Platform, args: argparse.Namespace, ckpt: str) -> float:
    """Output tokens/s of the engine at tp=1: 64 rows, 32 new tokens each (tiny model)."""
    from internlm2_tp.checkpoint import CheckpointReader
    from internlm2_tp.config import ModelConfig
    from internlm2_tp.engine.engine import Engine, EngineConfig
    from internlm2_tp.engine.params import SamplingParams
    from internlm2_tp.model import InternLM2Model
    from internlm2_tp.parallel.group import TPGroup

    model = InternLM2Model(ModelConfig.from_dir(ckpt), TPGroup(), getattr(torch, args.dtype),
                           p.local_device(0), p)
    model.load_weights(CheckpointReader(ckpt))
    g = torch.Generator().manual_seed(0)
    reqs = [(i, [1] + torch.randint(3, 1000, (int(n),), generator=g).tolist(),
             SamplingParams(max_new_tokens=32, ignore_eos=True))
            for i, n in enumerate(torch.randint(16, 200, (64,), generator=g))]
    engine = Engine(model, EngineConfig(block_size=128, kv_cache_gb=0.25), (2,))
    engine.generate(reqs[:2])                                         # warm-up
    p.synchronize(model.device)
    t = time.perf_counter()
    engine.generate(reqs)
    p.synchronize(model.device)
    return 64 * 32 / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=["auto", "npu", "cuda", "cpu"])
    ap.add_argument("--emulate-npu", action="store_true",
                    help="NpuPlatform on CPU tensors with the torch_npu stand-in")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint

    p, dtype = make_platform(args), getattr(torch, args.dtype)
    dev = p.local_device(0)
    name = f"{p.kind}{' emulated' if args.emulate_npu else ''} on {dev}, {args.dtype}"
    rows: list[tuple[str, str, bool]] = []
    tol = TOL[dtype]
    for check, err in check_ops(p, dev, dtype):
        rows.append((check, f"max rel err {err:.2e} (tol {tol:.0e})", err < tol))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_tiny_checkpoint(Path(tmp) / "ckpt", TinySpec(**SPEC)))
        err, agree = check_forward(args, ckpt)
        ok = err < 5 * tol and agree > 0.9
        rows.append((f"forward tp={args.tp}", f"max rel err {err:.2e}, argmax agree "
                     f"{agree:.1%}", ok))
        job_ckpt = write_tiny_checkpoint(Path(tmp) / "job-ckpt",       # the tokenizer's vocab
                                         TinySpec(**dict(SPEC, vocab_size=0, dtype="bfloat16")))
        written, errors = check_job(p, args, str(job_ckpt), Path(tmp) / "job")
        rows.append(("job end to end (tp=1)", f"{written} rows written, {errors} errors",
                     written == 8 and errors == 0))
        tok_s = throughput(p, args, ckpt)
        rows.append(("throughput (tp=1, 64 rows)", f"{tok_s:.0f} output tokens/s", True))
    print(f"device check: {name}, tp={args.tp}")
    width = max(len(r[0]) for r in rows)
    for check, detail, ok in rows:
        print(f"  {check:<{width}}  {'ok  ' if ok else 'FAIL'}  {detail}")
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
