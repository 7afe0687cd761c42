"""Bad checkpoints give a clear error naming the culprit (file, tensor, field)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _ranks import build_model
from internlm2_tp.checkpoint import CheckpointError, CheckpointReader
from internlm2_tp.config import ConfigError, ModelConfig, check_tp
from internlm2_tp.model import InternLM2Model
from internlm2_tp.parallel.group import TPGroup

SPEC = dict(dtype="float32", hidden_size=96, num_attention_heads=48, num_key_value_heads=8,
            intermediate_size=64, num_hidden_layers=2, vocab_size=512)


@pytest.fixture
def ckpt(make_ckpt, tmp_path) -> Path:
    d = tmp_path / "c"
    shutil.copytree(make_ckpt(**SPEC), d)
    return d


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def test_reader_reads_index_and_slices(ckpt):
    r = CheckpointReader(ckpt)
    assert r.format == "safetensors" and len(set(r.weight_map.values())) == 2
    full = r.read("output.weight")
    assert torch.equal(r.read("output.weight", rows=(10, 20)), full[10:20])
    assert torch.equal(r.read("output.weight", cols=(5, 9)), full[:, 5:9])


def test_missing_tensor_named(ckpt):
    from safetensors.torch import load_file, save_file

    f = _shards(ckpt)[0]
    sd = load_file(f)
    victim = sorted(sd)[0]
    del sd[victim]
    save_file(sd, str(f))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    del index["weight_map"][victim]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor {victim} is missing"):
        build_model(0, 1, 0, ckpt)


def test_index_names_tensor_absent_from_file(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.attention.wo.weight"] = "model-00009-of-00009.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00009-of-00009.safetensors, which is missing"):
        CheckpointReader(ckpt)


def test_wrong_shape_named(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"feed_forward\.w[123]\.weight has shape"):
        build_model(0, 1, 0, ckpt)


def test_truncated_file_named(ckpt):
    f = _shards(ckpt)[1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{f.name}: truncated"):
        CheckpointReader(ckpt)


def test_missing_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json is missing"):
        ModelConfig.from_dir(ckpt)


def test_unexpected_tensor_named(ckpt):
    from safetensors.torch import load_file, save_file

    f = _shards(ckpt)[0]
    sd = load_file(f)
    sd["model.layers.7.attention.wo.weight"] = torch.zeros(2, 2)
    save_file(sd, str(f))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.7.attention.wo.weight"] = f.name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.7.attention.wo"):
        build_model(0, 1, 0, ckpt)


@pytest.mark.parametrize("tp", [3, 5, 32])
def test_unsupported_tp_refused_before_reading(ckpt, tp):
    cfg = ModelConfig.from_dir(ckpt)
    with pytest.raises(ConfigError, match=r"parallel.tp: .*valid degrees .*\[1, 2, 4, 8, 16, 24, 48\]"):
        check_tp(cfg, tp)
    with pytest.raises(ConfigError, match="parallel.tp"):
        InternLM2Model(cfg, TPGroup(rank=0, size=tp), torch.float32, torch.device("cpu"))


def test_malicious_bin_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "config.json").write_text("{}")
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: refused"):
        CheckpointReader(tmp_path)


def test_auto_map_ignored_and_config_fields(make_ckpt):
    d = make_ckpt(**SPEC, rope_scaling={"type": "dynamic", "factor": 2.0})
    raw = json.loads((d / "config.json").read_text())
    assert "auto_map" in raw  # published checkpoints carry it; we never import it
    cfg = ModelConfig.from_dir(d)
    assert cfg.rope_scaling.type == "dynamic" and cfg.rope_scaling.factor == 2.0
    assert cfg.head_dim == 2 and cfg.q_per_kv == 6


@pytest.mark.parametrize("field,value,msg", [
    ("num_key_value_heads", 7, "not a multiple of num_key_value_heads"),
    ("bias", True, "bias=true is not supported"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0}, "rope_scaling.type"),
    ("torch_dtype", "int8", "torch_dtype must be one of"),
    ("architectures", ["GPT2LMHeadModel"], "architectures"),
])
def test_bad_config_fields(ckpt, field, value, msg):
    raw = json.loads((ckpt / "config.json").read_text())
    raw[field] = value
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_dir(ckpt)


def test_missing_required_field(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["rope_theta"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="rope_theta"):
        ModelConfig.from_dir(ckpt)


def test_hf_cache_snapshot_of_symlinks_is_read(ckpt, tmp_path):
    """A Hugging Face cache snapshot: every file a symlink into ../../blobs. Its index names
    plain file names, so it is inside the checkpoint even though the links resolve elsewhere."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "0123abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(ckpt.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    r = CheckpointReader(snap)
    assert torch.equal(r.read("output.weight"), CheckpointReader(ckpt).read("output.weight"))
    build_model(0, 1, 0, snap)  # every tensor found and loaded


@pytest.mark.parametrize("fname", ["../model-00001-of-00002.safetensors", "/etc/passwd", "",
                                   "sub/model.safetensors", ".."])
def test_index_cannot_point_outside(ckpt, fname):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["output.weight"] = fname
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="output.weight points outside the checkpoint"):
        CheckpointReader(ckpt)
