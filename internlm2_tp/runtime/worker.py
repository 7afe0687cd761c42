"""One rank: one device, one shard of the model, one engine. Used as the body of a Ray actor and
of a torchrun rank alike.

Every rank of a group receives the same `run()` calls in the same order and runs the same
deterministic engine loop; only rank 0's results are shipped back (the others return a digest
of theirs, so the driver can prove the ranks agreed).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from internlm2_tp.checkpoint import CheckpointReader
from internlm2_tp.config import ModelConfig, with_task
from internlm2_tp.engine.config import EngineConfig
from internlm2_tp.engine.engine import Engine, Finished
from internlm2_tp.job_config import JobConfig
from internlm2_tp.model import InternLM2Model
from internlm2_tp.parallel.group import TPGroup, destroy_tp_group, init_tp_group
from internlm2_tp.parallel.platform import PLATFORMS, Platform, get_platform
from internlm2_tp.runtime.data.rows import Request

log = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    model_path: str
    dtype: str
    device: str                     # auto, npu, cuda, cpu
    tp: int
    rank: int
    master_addr: str
    master_port: int
    engine: EngineConfig
    timeout_s: float = 600.0
    env: dict[str, str] = field(default_factory=dict)   # e.g. HCCL_* settings
    threads: int = 0                # torch CPU threads; 0: leave torch's default
    need_tokenizer: bool = False    # stop strings are matched on text inside the engine (a job
                                    # always loads it: any row may have a `stop` column)
    local_index: int = 0            # device index on the node (0 under Ray: one visible device)
    task: str = "auto"              # model.task
    lora: str = ""                  # model.lora: a PEFT adapter merged into this rank's slices

    @classmethod
    def from_job(cls, cfg: JobConfig, device: str, rank: int = 0, master_addr: str = "127.0.0.1",
                 threads: int = 0, local_index: int = 0) -> WorkerSpec:
        """A rank of the job `cfg` on `device` (npu, cuda or cpu), for Ray and torchrun alike."""
        return cls(model_path=str(Path(cfg.model.path).resolve()), dtype=cfg.model.dtype,
                   device=device, tp=cfg.parallel.tp, rank=rank, master_addr=master_addr,
                   master_port=0, engine=cfg.engine, timeout_s=cfg.parallel.timeout_s,
                   env=PLATFORMS[device]().job_env(cfg.parallel), threads=threads,
                   need_tokenizer=True, local_index=local_index, task=cfg.model.task,
                   lora=str(Path(cfg.model.lora).resolve()) if cfg.model.lora else "")


def _counters(eng: Engine) -> dict[str, int]:
    return {"steps": eng.steps, "tokens": eng.tokens_generated,
            "preemptions": eng.scheduler.num_preemptions,
            "prefix_hit_tokens": eng.blocks.prefix_hit_tokens}


def digest(results: list[Finished]) -> str:
    h = hashlib.sha256()
    for f in results:
        h.update(repr((f.request_id, f.sample_index, f.output_ids, f.finish_reason,
                       f.reward)).encode())
    return h.hexdigest()


def agree_dtype(tp: TPGroup, dtype: torch.dtype) -> torch.dtype:
    """One dtype for the group. `auto` on a CPU depends on the host's bf16 support, which the
    ranks of a torchrun job spanning machines may not share: the widest proposal wins."""
    every = tp.all_gather_object(str(dtype).removeprefix("torch."))
    if len(set(every)) == 1:
        return dtype
    chosen = "float32" if "float32" in every else "bfloat16"
    if tp.rank == 0:
        log.warning("ranks resolved model.dtype to %s: all use %s", every, chosen)
    return getattr(torch, chosen)


class Worker:
    def __init__(self, spec: WorkerSpec, platform: Platform | None = None):
        """`platform`: None resolves spec.device in setup(); tools pass one (e.g. the NPU
        emulated on CPU by scripts/device_check.py)."""
        self.spec, self.platform = spec, platform
        self.engine: Engine | None = None

    def set_master(self, addr: str, port: int) -> None:
        self.spec.master_addr, self.spec.master_port = addr, port

    def setup(self) -> dict[str, Any]:
        """Join the group, load this rank's shard, size the KV cache. Returns the facts."""
        s = self.spec
        os.environ.update(s.env)
        if s.threads:
            torch.set_num_threads(s.threads)
        t0 = time.perf_counter()
        platform = self.platform or get_platform(s.device)
        platform.prepare_process()
        device = platform.local_device(s.local_index)
        cfg = with_task(ModelConfig.from_dir(s.model_path), s.task)
        tp = init_tp_group(platform, s.rank, s.tp, s.master_addr, s.master_port, s.timeout_s)
        dtype = agree_dtype(tp, platform.model_dtype(s.dtype, cfg))
        model = InternLM2Model(cfg, tp, dtype, device, platform)
        reader = CheckpointReader(s.model_path)
        if s.lora:   # merged into this rank's slices as they are read
            from internlm2_tp.lora import LoraAdapter, MergingReader
            reader = MergingReader(reader, LoraAdapter(s.lora, cfg.layout, reader))
        model.load_weights(reader)
        load_s = time.perf_counter() - t0
        tokenizer = None
        if s.need_tokenizer:
            from internlm2_tp.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_dir(s.model_path, chat_template="builtin")  # text only
        self.engine = Engine(model, s.engine, cfg.eos_token_id, tokenizer)
        facts = self.engine.facts
        if s.rank == 0:
            log.info("rank 0 ready in %.1fs on %s (%s): %s", load_s, device, dtype, facts.describe())
        return {"rank": s.rank, "device": str(device), "dtype": str(dtype), "load_s": load_s,
                "facts": facts, "pid": os.getpid(),
                "checkpoint_bytes": reader.total_bytes()}

    def run(self, requests: list[Request], return_after: int) -> tuple[list[Finished] | str, dict]:
        """Queue `requests`, then step until at least `return_after` rows finished (or no work
        is left). Rank 0 returns the finished rows, other ranks a digest of theirs."""
        eng = self.engine
        assert eng is not None, "setup() first"
        done: list[Finished] = []
        for r in requests:
            try:
                eng.add_request(r.row_id, r.prompt_ids, r.params, r.samples)
            except ValueError as e:  # this row alone cannot run (e.g. longer than the cache)
                done += [Finished(r.row_id, len(r.prompt_ids), [], "error", error=str(e),
                                  sample_index=i) for i in r.samples]
        t0 = time.perf_counter()
        before = _counters(eng)
        while eng.has_work() and len(done) < max(1, return_after):
            done += eng.step()
        # This run's share of each counter (the driver adds them up: runtime/metrics.py).
        stats = {k: v - before[k] for k, v in _counters(eng).items()}
        stats.update(busy_s=time.perf_counter() - t0, unfinished=eng.num_unfinished())
        return (done if self.spec.rank == 0 else digest(done)), stats

    def shutdown(self) -> None:
        if self.engine is not None:
            destroy_tp_group(self.engine.model.tp)
            self.engine = None

    def ping(self) -> int:
        return os.getpid()
