"""A rank actor of a Ray group runs at normal priority (Ray starts its workers at nice 15)."""
from __future__ import annotations

import os

import psutil
import pytest


@pytest.mark.slow
def test_rank_actors_run_at_nice_zero(ray_gcs, make_ckpt):
    import ray

    from internlm2_tp.engine.engine import EngineConfig
    from internlm2_tp.runtime.cluster.ray_group import RayGroup
    from internlm2_tp.runtime.worker import WorkerSpec

    ckpt = make_ckpt(dtype="float32", hidden_size=64, num_attention_heads=8,
                     num_key_value_heads=8, intermediate_size=128, num_hidden_layers=1,
                     vocab_size=1000)
    spec = WorkerSpec(model_path=str(ckpt), dtype="float32", device="cpu", tp=1, rank=0,
                      master_addr="127.0.0.1", master_port=0,
                      engine=EngineConfig(block_size=16, num_kv_blocks=8), threads=1)
    ray.init(address=ray_gcs, runtime_env={"env_vars": {
        "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    group = RayGroup(0, spec, "cpu", 1.0, timeout_s=60)
    try:
        facts = group.start()
        assert psutil.Process(facts[0]["pid"]).nice() == 0
        assert os.nice(0) == psutil.Process().nice()     # the driver's own is untouched
    finally:
        group.shutdown()
        ray.shutdown()
