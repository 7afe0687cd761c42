"""Long prompts through the job against a single-pass reference, in one run (issue 26's table).

    python -m internlm2_tp.bench.long_context tokens=4096,40000 tp=2 out=/tmp/lc

Per prompt length L: the test model (hidden 256, 16 q / 8 KV heads of dim 16, 2 layers,
max_position_embeddings 32768 with dynamic NTK factor 2, fp32, random weights) gets one prompt
of L tokens and two short ones (100, 300), greedy, NEW tokens each.

- job: `python jobs/batch_infer.py` as a process at parallel.tp=tp on a local Ray cluster of
  its own (the engine's defaults: 2048-token steps, so the long prompt is prefilled in chunks
  continuing cached keys). Wall = process start to exit (Ray start, load and Parquet included);
  run = the manifest's wall_s; engine = the group's busy_s (its engine steps alone). Peak
  RSS = the largest sum, sampled every 0.2 s, of the RSS of the job's process tree (driver,
  Ray's processes, the rank actors).
- reference: one fresh process, tp 1, torch's threads = the machine's cores: each prompt
  prefilled in one step (one SDPA is_causal call per layer over the whole prompt), then
  decoded; wall from process start to exit, compute = the generate calls alone. Its tokens
  are the ones the job must match.

Nothing here is a test; it prints one table and writes `long_context.json` under out.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
SPEC = dict(dtype="float32", hidden_size=256, num_attention_heads=16, num_key_value_heads=8,
            intermediate_size=512, num_hidden_layers=2, max_position_embeddings=32768,
            rope_scaling={"type": "dynamic", "factor": 2.0})
SHORT = (100, 300)
NEW = 8


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab - 100, (m - 1,), generator=g).tolist()
            for m in (n, *SHORT)]


def reference(ckpt: str, rows: list[list[int]]) -> dict:
    """Each row alone: its whole prompt in one engine step, then NEW greedy tokens."""
    import torch

    from internlm2_tp.checkpoint import CheckpointReader
    from internlm2_tp.config import ModelConfig
    from internlm2_tp.engine.engine import Engine, EngineConfig
    from internlm2_tp.engine.params import SamplingParams
    from internlm2_tp.model import InternLM2Model
    from internlm2_tp.parallel.group import init_tp_group

    cfg = ModelConfig.from_dir(ckpt)
    model = InternLM2Model(cfg, init_tp_group("cpu", 0, 1, "127.0.0.1", 0), torch.float32,
                           torch.device("cpu"))
    model.load_weights(CheckpointReader(ckpt))
    longest = max(len(r) for r in rows) + NEW
    eng = Engine(model, EngineConfig(max_num_seqs=1, max_num_batched_tokens=longest,
                                     max_model_len=longest), cfg.eos_token_id)
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    t0 = time.perf_counter()
    out = [eng.generate([(i, r, params)])[0].output_ids for i, r in enumerate(rows)]
    return {"tokens": out, "compute_s": time.perf_counter() - t0}


def sample_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], total / 2**30)
        except psutil.Error:
            pass
        stop.wait(0.2)


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, peak GiB of the process tree, stdout+stderr tail) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    stop, peak = threading.Event(), [0.0]
    th = threading.Thread(target=sample_rss, args=(proc.pid, stop, peak), daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}:\n{out[-3000:]}")
    return wall, peak[0], out[-2000:]


def one_length(n: int, tp: int, ckpt: str, vocab: int, out: Path, env: dict) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = out / f"len{n}"
    d.mkdir(parents=True, exist_ok=True)
    rows = prompts(n, vocab)
    pq.write_table(pa.table({"id": [0, 1, 2], "prompt_token_ids": rows}), d / "in.parquet")
    (d / "rows.json").write_text(json.dumps(rows))
    ref_wall, ref_rss, _ = timed([sys.executable, "-m", "internlm2_tp.bench.long_context",
                                  "_reference", ckpt, str(d)], env)
    ref = json.loads((d / "ref.json").read_text())
    want = ref["tokens"]
    job_wall, job_rss, _ = timed([
        sys.executable, "jobs/batch_infer.py", f"model.path={ckpt}", "model.dtype=float32",
        f"data.input={d / 'in.parquet'}", f"data.output={d / 'out'}", "data.overwrite=true",
        f"parallel.tp={tp}", "parallel.device=cpu", "ray.address=local",
        f"generation.max_new_tokens={NEW}", "generation.ignore_eos=true",
        f"engine.max_model_len={n + NEW}"], env)
    got = pq.read_table(d / "out").to_pydict()
    by_id = dict(zip(got["id"], got["completion_token_ids"]))
    exact = sum(by_id[i] == want[i] for i in range(3))
    manifest = json.loads((d / "out" / "_manifest.json").read_text())
    run, busy = manifest["wall_s"], sum(g["busy_s"] for g in manifest["groups"])
    return {"tokens": n, "exact": exact, "job_wall_s": job_wall, "job_run_s": run,
            "job_engine_s": busy, "ratio_engine": busy / ref["compute_s"],
            "ref_wall_s": ref_wall, "ref_compute_s": ref["compute_s"],
            "ratio_wall": job_wall / ref_wall, "ratio_run": run / ref["compute_s"],
            "job_peak_rss_gib": job_rss, "ref_peak_rss_gib": ref_rss}


def cpu_flags() -> str:
    flags = set(open("/proc/cpuinfo").read().split())
    return " ".join(f for f in ("avx", "avx2", "avx512f", "avx512_bf16", "amx_tile")
                    if f in flags)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_reference":
        ckpt, d = argv[1], Path(argv[2])
        (d / "ref.json").write_text(json.dumps(reference(ckpt, json.loads(
            (d / "rows.json").read_text()))))
        return 0
    kw = dict(a.split("=", 1) for a in argv)
    unknown = set(kw) - {"tokens", "tp", "out"}
    if unknown:
        print(f"unknown keys {sorted(unknown)} (tokens=, tp=, out=)", file=sys.stderr)
        return 2
    lengths = [int(x) for x in kw.get("tokens", "4096,40000").split(",")]
    tp, out = int(kw.get("tp", 2)), Path(kw.get("out", tempfile.mkdtemp(prefix="lc")))
    from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(out / "ckpt", TinySpec(**SPEC))
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": tempfile.mkdtemp(prefix="rlc", dir="/tmp")}
    results = [one_length(n, tp, str(ckpt), vocab, out, env) for n in lengths]
    (out / "long_context.json").write_text(json.dumps(results, indent=1))
    print(f"CPU: {os.cpu_count()} cores, flags {cpu_flags()}; tp={tp}; one prompt of L tokens "
          f"+ {len(SHORT)} short ones, {NEW} new tokens each")
    print("| prompt | tokens exact | job wall / run / engine | reference wall / compute | "
          "ratio wall / run / engine | peak RSS job | reference |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tokens']:,} | {r['exact']}/3 | {r['job_wall_s']:.1f} / "
              f"{r['job_run_s']:.1f} / {r['job_engine_s']:.1f} s | {r['ref_wall_s']:.1f} / "
              f"{r['ref_compute_s']:.1f} s | {r['ratio_wall']:.2f} / {r['ratio_run']:.2f} / "
              f"{r['ratio_engine']:.2f} | {r['job_peak_rss_gib']:.2f} GiB | "
              f"{r['ref_peak_rss_gib']:.2f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
