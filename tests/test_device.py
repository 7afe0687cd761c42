"""The device layer. CPU tests (always run): device resolution, the Ray visible-devices mapping
(pure logic, and real Ray actors given a declared NPU resource), the HCCL environment from the
job config, and npu_attention's layout/metadata logic against a stand-in for torch_npu's
attention kernels written from their documentation. Device tests (skipped with the reason
where the device is absent): each op, attention, and a tp=1 forward on the device in fp16/bf16
against the CPU fp32 plain path; on CUDA also a tp=1 job end to end."""
from __future__ import annotations

import pytest
import torch

from internlm2_tp import npu_attention, ops
from internlm2_tp.attention import AttentionMetadata, paged_attention, write_kv
from internlm2_tp.parallel import device as dv

F16, BF16 = torch.float16, torch.bfloat16
TOL = {F16: dict(rtol=1e-2, atol=1e-2), BF16: dict(rtol=4e-2, atol=4e-2)}


def has_npu() -> bool:
    try:
        import torch_npu  # noqa: F401
        return bool(torch.npu.is_available())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - ImportError or CANN missing
        return False


@pytest.fixture(params=["cuda", "npu"])
def device_type(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if request.param == "npu" and not has_npu():
        pytest.skip("torch_npu not installed or no NPU")
    return request.param


# -- device resolution and the visible-devices mapping (CPU) -----------------------------------
def test_resolve_device_type() -> None:
    assert dv.resolve_device_type("cpu") == "cpu"
    with pytest.raises(ValueError, match="parallel.device"):
        dv.resolve_device_type("tpu")
    if not has_npu():
        assert dv.resolve_device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(dv.DeviceError, match="parallel.device=cuda"):
            dv.resolve_device_type("cuda")
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        with pytest.raises(dv.DeviceError, match="torch_npu"):
            dv.resolve_device_type("npu")


def test_parse_visible() -> None:
    assert dv.parse_visible("npu", None) is None
    assert dv.parse_visible("npu", "0,2,5") == ["0", "2", "5"]
    with pytest.raises(dv.DeviceError, match="ASCEND_RT_VISIBLE_DEVICES='3,1'.*ascending"):
        dv.parse_visible("npu", "3,1")
    with pytest.raises(dv.DeviceError, match="twice"):
        dv.parse_visible("npu", "1,1")
    with pytest.raises(dv.DeviceError, match="integer"):
        dv.parse_visible("npu", "a,b")
    assert dv.parse_visible("cuda", "GPU-1234,GPU-0abc") == ["GPU-1234", "GPU-0abc"]


@pytest.mark.parametrize("dt", ["npu", "cuda"])
def test_logical_index(dt: str) -> None:
    var, noset = dv.VISIBLE_ENV[dt], dv.NOSET_ENV[dt]
    assert dv.logical_index(dt, ["5"], {var: "5"}) == 0                 # Ray set the variable
    assert dv.logical_index(dt, ["5"], {noset: "1"}) == 5               # NOSET, all visible
    assert dv.logical_index(dt, ["5"], {noset: "1", var: "2,5,7"}) == 1  # NOSET, restricted
    with pytest.raises(dv.DeviceError, match=f"{var}='2,7'.*{noset}"):
        dv.logical_index(dt, ["5"], {noset: "1", var: "2,7"})
    assert dv.logical_index(dt, [], {}, fallback=3) == 3                # torchrun LOCAL_RANK
    with pytest.raises(dv.DeviceError, match="LOCAL_RANK"):
        dv.logical_index(dt, [], {var: "4,6"}, fallback=2)


def test_local_device_selects_the_ray_assigned_device(monkeypatch) -> None:
    """The plumbing of local_device on a simulated Ray actor (NOSET, 2 of 8 GPUs visible)."""
    assert dv.ray_assigned_ids("npu") == [] and dv.ray_assigned_ids("cpu") == []  # no Ray here
    chosen: list[int] = []
    monkeypatch.setattr(dv, "ray_assigned_ids", lambda t: ["6"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,6")
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert dv.local_device("cuda", 0) == torch.device("cuda:1") and chosen == [1]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(dv.DeviceError, match="sees 1 device"):
        dv.local_device("cuda", 0)
    assert dv.local_device("cpu") == torch.device("cpu")


class _RankView:
    """What a rank actor sees: Ray's assignment, the variable, and the index it would use."""

    def view(self) -> tuple[list[str], str | None, int]:
        import os
        ids = dv.ray_assigned_ids("npu")
        env = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        return ids, env, dv.logical_index("npu", ids, os.environ)


@pytest.mark.slow
def test_ray_actor_npu_mapping() -> None:
    """Real Ray actors on a node declaring {"NPU": 2} (as `ray start --resources` does)."""
    ray = pytest.importorskip("ray")
    from conftest import ROOT

    path = {"PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"}   # the workers import this module
    ray.init(address="local", num_cpus=2, resources={"NPU": 2}, include_dashboard=False,
             runtime_env={"env_vars": path}, logging_level="ERROR")
    try:
        actor = ray.remote(_RankView)
        a = actor.options(num_cpus=0, resources={"NPU": 1}).remote()
        ids, env, idx = ray.get(a.view.remote())
        assert len(ids) == 1 and env == ids[0] and idx == 0        # Ray set it: logical npu:0
        noset = {"env_vars": {**path, dv.NOSET_ENV["npu"]: "1"}}
        b = actor.options(num_cpus=0, resources={"NPU": 1}, runtime_env=noset).remote()
        ids, env, idx = ray.get(b.view.remote())
        assert len(ids) == 1 and env is None and idx == int(ids[0])
    finally:
        ray.shutdown()


def test_hccl_env_and_npu_resources() -> None:
    from internlm2_tp.job_config import JobConfigError, ParallelSection, load_job_config
    from internlm2_tp.runtime.ray_pool import device_resources

    assert ParallelSection().hccl_env() == {"HCCL_CONNECT_TIMEOUT": "120",
                                            "HCCL_EXEC_TIMEOUT": "1836", "HCCL_BUFFSIZE": "200"}
    cfg = load_job_config(None, ["parallel.hccl_if_ip=10.0.0.5", "parallel.hccl_buffsize=400",
                                 "parallel.hccl_connect_timeout=600"])
    assert cfg.parallel.hccl_env() == {"HCCL_CONNECT_TIMEOUT": "600", "HCCL_EXEC_TIMEOUT": "1836",
                                       "HCCL_BUFFSIZE": "400", "HCCL_IF_IP": "10.0.0.5"}
    with pytest.raises(JobConfigError, match="hccl_connect_timeout"):
        load_job_config(None, ["parallel.hccl_connect_timeout=60"])
    bundle, opts = device_resources("npu", 1.0)
    assert bundle["NPU"] == 1 and opts["resources"] == {"NPU": 1}


# -- npu_attention against a documented-semantics stand-in for torch_npu (CPU) ------------------
class FakeTorchNpu:
    """npu_incre_flash_attention (paged, BSH) and npu_fusion_attention (TND, sparse_mode 3) as
    the torch_npu docs define them, asserting the documented argument contracts."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def npu_incre_flash_attention(self, query, key, value, *, actual_seq_lengths, block_table,
                                  num_heads, num_key_value_heads, scale_value, input_layout,
                                  block_size):
        self.calls.append("ifa")
        b, s, hd = query.shape
        nb, bs, kvhd = key.shape
        assert input_layout == "BSH" and s == 1 and query.dtype in (F16, BF16)
        assert block_table.dtype == torch.int32 and block_table.shape[0] == b
        assert [type(x) for x in actual_seq_lengths] == [int] * b and bs == block_size
        d, g = hd // num_heads, num_heads // num_key_value_heads
        assert kvhd == num_key_value_heads * d and block_size % 16 == 0
        out = []
        for i, n in enumerate(actual_seq_lengths):
            blocks = block_table[i, : -(-n // bs)].long()
            kk = key[blocks].reshape(-1, num_key_value_heads, d)[:n].float().repeat_interleave(g, 1)
            vv = value[blocks].reshape(-1, num_key_value_heads, d)[:n].float().repeat_interleave(g, 1)
            p = (torch.einsum("hd,nhd->hn", query[i, 0].float().view(num_heads, d), kk)
                 * scale_value).softmax(-1)
            out.append(torch.einsum("hn,nhd->hd", p, vv).reshape(1, hd))
        return torch.stack(out).to(query.dtype)

    def npu_fusion_attention(self, query, key, value, head_num, input_layout, *, atten_mask,
                             scale, sparse_mode, actual_seq_qlen, actual_seq_kvlen):
        self.calls.append("fa")
        assert input_layout == "TND" and sparse_mode == 3 and query.shape[1] == head_num
        assert torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))
        assert actual_seq_qlen[-1] == query.shape[0] and actual_seq_kvlen[-1] == key.shape[0]
        g, outs, q0, k0 = head_num // key.shape[1], [], 0, 0
        for qe, ke in zip(actual_seq_qlen, actual_seq_kvlen):
            n, c = qe - q0, ke - k0
            kk = key[k0:ke].float().repeat_interleave(g, 1)
            vv = value[k0:ke].float().repeat_interleave(g, 1)
            s = torch.einsum("qhd,khd->hqk", query[q0:qe].float(), kk) * scale
            seen = torch.arange(c)[None, :] <= (c - n + torch.arange(n))[:, None]  # right-down
            p = s.masked_fill(~seen, float("-inf")).softmax(-1)
            outs.append(torch.einsum("hqk,khd->qhd", p, vv))
            q0, k0 = qe, ke
        return torch.cat(outs).to(query.dtype), None, None, None, 0, 0, 0


def make_step(seqs: list[tuple[int, int]], bs: int, h: int, kvh: int, d: int,
              dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """A step over (cached, new) sequences (decodes first), blocks scattered over the cache."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // bs) for c, n in seqs]
    perm = torch.randperm(sum(need) + 3, generator=g).tolist()
    tables, slots, pos, b0 = [], [], [], 0
    for (c, n), nb in zip(seqs, need):
        tables.append(perm[b0:b0 + nb])
        b0 += nb
        pos += range(c, c + n)
        slots += [tables[-1][p // bs] * bs + p % bs for p in range(c, c + n)]
    width = max(need)
    t = sum(n for _, n in seqs)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kc, vc = rnd(len(perm), bs, kvh, d), rnd(len(perm), bs, kvh, d)
    q, k, v = rnd(t, h, d), rnd(t, kvh, d), rnd(t, kvh, d)
    nd = sum(n == 1 for _, n in seqs)
    L = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731

    def meta() -> AttentionMetadata:
        ctx = [c + n for c, n in seqs]
        return AttentionMetadata(
            positions=L(pos), rope_lengths=L(pos) + 1, slot_mapping=L(slots),
            block_tables=L([tb + [0] * (width - len(tb)) for tb in tables]), context_lens=L(ctx),
            query_lens=L([n for _, n in seqs]), logits_indices=None, num_decodes=nd,
            max_decode_context=max(ctx[:nd], default=0),
            max_prefill_query=max((n for _, n in seqs[nd:]), default=0),
            max_prefill_context=max(ctx[nd:], default=0))
    tensors = [x.to(device=device, dtype=dtype) for x in (q, k, v, kc, vc)]
    return meta, tensors, [x.to(device) for x in (q, k, v, kc, vc)]


# (cached, new) per sequence: decodes (incl. a 1-token prompt), fresh prompts, both together,
# and prompts continuing cached keys (chunked prefill, prefix-cache hits) beside decodes.
STEPS = {"decode": [(5, 1), (37, 1), (0, 1)], "prefill": [(0, 7), (0, 20)],
         "mixed": [(40, 1), (3, 1), (0, 9), (0, 17)],
         "mixed+prefix": [(40, 1), (0, 9), (16, 5), (33, 30)]}


def reference_attention(meta, fp32: list[torch.Tensor], scale: float) -> torch.Tensor:
    q, k, v, kc, vc = [x.float().cpu().clone() for x in fp32]
    m = meta()
    m = AttentionMetadata(**{f: getattr(m, f).cpu() if isinstance(getattr(m, f), torch.Tensor)
                             else getattr(m, f) for f in m.__dataclass_fields__ if f != "derived"})
    return paged_attention(q, k, v, kc, vc, m, scale)


@pytest.mark.parametrize("step", list(STEPS))
def test_npu_attention_logic_with_documented_kernels(step: str, monkeypatch) -> None:
    meta, (q, k, v, kc, vc), fp32 = make_step(STEPS[step], 16, 12, 4, 32, BF16)
    ref = reference_attention(meta, fp32, 0.2)
    fake, m = FakeTorchNpu(), meta()
    write_kv(kc, vc, k, v, m.slot_mapping)
    builds: list[int] = []
    real_build = npu_attention.build_step_plan
    monkeypatch.setattr(npu_attention, "build_step_plan", lambda *a: builds.append(1) or real_build(*a))
    outs = [npu_attention.npu_paged_attention(q, k, v, kc, vc, m, 0.2, fake) for _ in range(2)]
    assert builds == [1], "the step plan must be built once per step, not per layer"
    assert outs[0] is not None and torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0].float(), ref, **TOL[BF16])
    assert set(fake.calls) == {"decode": {"ifa"}, "prefill": {"fa"}}.get(step, {"ifa", "fa"})


def test_paged_attention_dispatches_to_npu_kernels_and_falls_back() -> None:
    """The model's one attention call: with torch_npu it runs the fused kernels (the fake
    records them); a step they do not document (fp32 here) falls back to the plain path."""
    meta, (q, k, v, kc, vc), fp32 = make_step(STEPS["mixed+prefix"], 16, 12, 4, 32, BF16)
    ref = reference_attention(meta, fp32, 0.2)
    fake = FakeTorchNpu()
    out = paged_attention(q, k, v, kc, vc, meta(), 0.2, fake)
    assert set(fake.calls) == {"ifa", "fa"}
    torch.testing.assert_close(out.float(), ref, **TOL[BF16])
    meta, (q, k, v, kc, vc), fp32 = make_step(STEPS["mixed+prefix"], 16, 12, 4, 32, torch.float32)
    fake = FakeTorchNpu()
    out = paged_attention(q, k, v, kc, vc, meta(), 0.2, fake)
    assert fake.calls == [] and torch.allclose(out, reference_attention(meta, fp32, 0.2), atol=1e-5)


def test_npu_attention_declines_unsupported_steps() -> None:
    meta, (q, k, v, kc, vc), _ = make_step(STEPS["mixed+prefix"], 16, 12, 4, 32, torch.float32)
    assert npu_attention.npu_paged_attention(q, k, v, kc, vc, meta(), 0.2, FakeTorchNpu()) is None
    meta, (q, k, v, kc, vc), _ = make_step(STEPS["decode"], 8, 12, 4, 32, F16)  # block % 16
    assert "block_size" in npu_attention.unsupported_reason(q, kc, meta())
    meta, (q, k, v, kc, vc), _ = make_step(STEPS["prefill"], 8, 12, 4, 32, F16)
    assert npu_attention.unsupported_reason(q, kc, meta()) is None    # prefill is not paged


# -- on the device (skipped here) --------------------------------------------------------------
@pytest.mark.device
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_ops_on_device(device_type: str, dtype: torch.dtype) -> None:
    dev = dv.local_device(device_type)
    fused = ops.npu_ops() if device_type == "npu" else None
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(33, 1024, generator=g), 1 + 0.1 * torch.randn(1024, generator=g)
    on = lambda *ts: [t.to(dev, dtype) for t in ts]  # noqa: E731
    torch.testing.assert_close(ops.rms_norm(*on(x, w), 1e-5, fused).float().cpu(),
                               ops.rms_norm(x, w, 1e-5), **TOL[dtype])
    q, k = torch.randn(33, 8, 128, generator=g), torch.randn(33, 2, 128, generator=g)
    ang = torch.rand(33, 64, generator=g) * 6
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    for got, want in zip(ops.apply_rotary(*on(q, k, cos, sin), fused), ops.apply_rotary(q, k, cos, sin)):
        torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])
    gu = torch.randn(33, 2 * 512, generator=g)
    torch.testing.assert_close(ops.silu_and_mul(*on(gu), fused).float().cpu(),
                               ops.silu_and_mul(gu), **TOL[dtype])


@pytest.mark.device
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("step", list(STEPS))
def test_attention_on_device(device_type: str, dtype: torch.dtype, step: str) -> None:
    dev = dv.local_device(device_type)
    meta, (q, k, v, kc, vc), fp32 = make_step(STEPS[step], 128, 48, 8, 128, dtype, str(dev))
    ref = reference_attention(meta, fp32, 128 ** -0.5)
    m = meta()
    if device_type == "npu":
        write_kv(kc, vc, k, v, m.slot_mapping)
        out = npu_attention.npu_paged_attention(q, k, v, kc, vc, m, 128 ** -0.5, ops.npu_ops())
        assert out is not None, "the fused kernels should take this step"
    else:
        out = paged_attention(q, k, v, kc, vc, m, 128 ** -0.5)
    torch.testing.assert_close(out.float().cpu(), ref, **TOL[dtype])


@pytest.mark.device
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_forward_tp1_on_device(device_type: str, dtype: torch.dtype, make_ckpt) -> None:
    from _ranks import build_model, prefill_logits
    from internlm2_tp.checkpoint import CheckpointReader
    from internlm2_tp.config import ModelConfig
    from internlm2_tp.model import InternLM2Model

    # head_dim 128 as the real models (the fused kernels' tested shapes), 4 q heads per KV head
    ckpt = make_ckpt(dtype="float32", hidden_size=1024, num_attention_heads=8,
                     num_key_value_heads=2, intermediate_size=2048, num_hidden_layers=2,
                     vocab_size=1000)
    seqs = [[1, 5, 9, 200, 7], [1] + list(range(30, 170)), [1, 999, 3]]
    ref = prefill_logits(build_model(0, 1, 0, ckpt), seqs)
    dev = dv.local_device(device_type)
    model = InternLM2Model(ModelConfig.from_dir(ckpt), dv.TPGroup(), dtype, dev)
    model.load_weights(CheckpointReader(ckpt))
    lens = [len(s) for s in seqs]
    from internlm2_tp.attention import dense_metadata
    meta = dense_metadata(lens, 128, dev, all_logits=True)
    shape = (sum(-(-n // 128) for n in lens), 128, model.kv_heads_local, 128)
    caches = [(torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype,
               device=dev)) for _ in model.layers]
    ids = torch.tensor([t for s in seqs for t in s], device=dev)
    out = model(ids, meta, caches).float().cpu()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert err < {F16: 2e-2, BF16: 5e-2}[dtype] and agree > 0.9, (err, agree)


@pytest.mark.device
def test_cuda_job_end_to_end(tmp_path, make_ckpt) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from _job import ROOT, read_out, write_prompts
    from internlm2_tp.job_config import load_job_config
    from internlm2_tp.runtime.driver import Job
    from internlm2_tp.runtime.torchrun_pool import TorchrunPool
    from internlm2_tp.runtime.worker import Worker, WorkerSpec

    ckpt = make_ckpt(dtype="bfloat16")
    data = write_prompts(tmp_path / "in.parquet", 12)
    cfg = load_job_config(ROOT / "conf" / "batch_infer.yaml", [
        f"model.path={ckpt}", f"data.input={data}", f"data.output={tmp_path / 'out'}",
        "parallel.device=cuda", "model.dtype=bfloat16", "generation.max_new_tokens=8"])
    spec = WorkerSpec(model_path=cfg.model.path, dtype=cfg.model.dtype, device="cuda", tp=1,
                      rank=0, master_addr="127.0.0.1", master_port=0, engine=cfg.engine)
    manifest = Job(cfg).run(TorchrunPool(Worker(spec)))
    rows = read_out(tmp_path / "out")
    assert manifest["errors"] == 0 and len(rows) == 12
    assert all(r["finish_reason"] in ("stop", "length") for r in rows.values())
