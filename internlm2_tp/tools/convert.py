"""Checkpoint conversion, streamed tensor by tensor.

    to=llama        InternLM2 layout -> Llama layout (wqkv split per KV group, no rotary permute)
    to=internlm2    Llama layout -> InternLM2 layout (q/k/v merged into grouped wqkv)
    to=safetensors  .bin shards -> .safetensors shards, same tensor names

Input is read through CheckpointReader, in file order. Output shards are planned from the input
shapes before any weight is read, so each shard's safetensors header is written first and every
tensor goes to disk as soon as it is made: memory holds one input tensor and what it turns into,
never a whole shard. Each shard is written under a temporary name and renamed when complete; the
index json comes last.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from internlm2_tp.checkpoint import IGNORED_SUFFIXES, CheckpointReader
from internlm2_tp.config import ModelConfig
from internlm2_tp.errors import CheckpointError
from internlm2_tp.model import WEIGHT_NAMES

TARGETS = ("llama", "internlm2", "safetensors")
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}
COPIED = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
          "generation_config.json")
INDEX = "model.safetensors.index.json"
ARCH = {"internlm2": "InternLM2ForCausalLM", "llama": "LlamaForCausalLM"}


class ConvertError(CheckpointError):
    """A conversion we refuse; the message names the checkpoint, tensor or setting."""


@dataclass
class ConvertArgs:
    to: str = ""                  # llama | internlm2 | safetensors
    input: str = ""
    output: str = ""
    overwrite: bool = False
    shard_size_mb: float = 2048.0  # MiB per output shard (a tensor larger than this gets its own)
    progress: bool = True


def parse_args(argv: list[str]) -> ConvertArgs:
    """`key=value` OmegaConf dotlist onto ConvertArgs; unknown keys and bad types name the key."""
    from omegaconf import OmegaConf

    from internlm2_tp.errors import JobConfigError

    try:
        args = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ConvertArgs),
                                                   OmegaConf.from_dotlist(list(argv))))
    except Exception as e:  # noqa: BLE001 - OmegaConf errors carry the key as full_key
        key, msg = getattr(e, "full_key", None), str(e).splitlines()[0]
        raise JobConfigError(f"{key}: {msg}" if key else msg) from e
    if args.to not in TARGETS:
        raise JobConfigError(f"to: must be one of {', '.join(TARGETS)}; got {args.to!r}")
    for key in ("input", "output"):
        if not getattr(args, key):
            raise JobConfigError(f"{key}: required ({key}=DIR)")
    if not args.shard_size_mb > 0:
        raise JobConfigError(f"shard_size_mb: must be > 0, got {args.shard_size_mb}")
    return args


# A step reads some input tensors and yields output (name, tensor) pairs; `outs` predicts them.
Out = tuple[str, tuple[int, ...], torch.dtype]


@dataclass
class Step:
    inputs: tuple[str, ...]
    outs: list[Out]
    make: Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _nbytes(out: Out) -> int:
    return out[2].itemsize * torch.Size(out[1]).numel()


def _dtype(reader: CheckpointReader, name: str) -> torch.dtype:
    if hasattr(reader, "dtype"):
        return reader.dtype(name)
    shape = reader.shape(name)  # a one-row read gives the dtype without reading the tensor
    return reader.read(name, (0, min(1, shape[0])) if shape else None).dtype


def _plan(reader: CheckpointReader, cfg: ModelConfig, to: str) -> list[Step]:
    names = [n for n in reader.weight_map
             if to == "safetensors" or not n.endswith(IGNORED_SUFFIXES)]
    names.sort(key=lambda n: str(reader.file_of(n)))  # file order: .bin maps one file at a time
    if to == "safetensors":
        return [Step((n,), [(n, reader.shape(n), _dtype(reader, n))], list) for n in names]
    src, dst = WEIGHT_NAMES[cfg.layout], WEIGHT_NAMES[to]
    kv, g, d, hid = cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim, cfg.hidden_size
    q_rows, kv_rows = cfg.num_attention_heads * d, kv * d
    fused, split = [(q_rows + 2 * kv_rows, hid)], [(q_rows, hid), (kv_rows, hid), (kv_rows, hid)]

    def split_qkv(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        w = ts[0].view(kv, g + 2, d, hid)  # per KV group: its g q heads, then its k, then its v
        return [w[:, :g].reshape(q_rows, hid), w[:, g].reshape(kv_rows, hid),
                w[:, g + 1].reshape(kv_rows, hid)]

    def merge_qkv(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        q, k, v = (t.view(kv, -1, d, hid) for t in ts)
        return [torch.cat([q, k, v], 1).reshape(q_rows + 2 * kv_rows, hid)]

    table = {}  # first input name -> (input names, output names, make)
    for key, pats in src.items():
        for i in range(cfg.num_hidden_layers if "{i}" in pats[0] else 1):
            s, t = tuple(n.format(i=i) for n in pats), [n.format(i=i) for n in dst[key]]
            if key.endswith("wqkv"):
                table[s[0]] = (s, t, split_qkv if to == "llama" else merge_qkv)
            else:
                table.update({a: ((a,), [b], list) for a, b in zip(s, t)})
    if cfg.tie_word_embeddings and not reader.has(src["output"][0]):
        table.pop(src["output"][0])
    wanted = {n for ins, _, _ in table.values() for n in ins}
    unexpected = [n for n in names if n not in wanted]
    if unexpected:
        raise ConvertError(f"{reader.file_of(unexpected[0])}: unexpected tensor "
                           f"{unexpected[0]} for a {cfg.layout} checkpoint of this config "
                           f"({len(unexpected)} in all)")
    missing = sorted(n for n in wanted if not reader.has(n))
    if missing:
        raise ConvertError(f"{reader.path}: tensor {missing[0]} is missing ({len(missing)} in all)")
    steps = []
    for n in (n for n in names if n in table):  # q/k/v: the step is keyed by q
        ins, outs, make = table[n]
        if make is list:
            shapes = [reader.shape(n)]
        else:
            for a, shape in zip(ins, fused if len(ins) == 1 else split):
                reader.expect_shape(a, shape)
            shapes = fused if len(outs) == 1 else split
        dt = _dtype(reader, n)
        steps.append(Step(ins, [(o, sh, dt) for o, sh in zip(outs, shapes)], make))
    return steps


class _ShardFile:
    """One safetensors file written tensor by tensor: the header is known in advance."""

    def __init__(self, final: Path, outs: list[Out]):
        self.final, self.outs, self.pos = final, outs, 0
        self.tmp = final.with_name(f".tmp-{final.name}")
        header, off = {}, 0
        for o in outs:
            header[o[0]] = {"dtype": ST_DTYPES[o[2]], "shape": list(o[1]),
                            "data_offsets": [off, off + _nbytes(o)]}
            off += _nbytes(o)
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, t: torch.Tensor) -> None:
        want = self.outs[self.pos]
        if (tuple(t.shape), t.dtype) != want[1:]:
            raise ConvertError(f"{self.final.name}: tensor {want[0]} came out {tuple(t.shape)} "
                               f"{t.dtype}, planned {want[1]} {want[2]}")
        self.f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
        self.pos += 1

    def close(self) -> None:
        assert self.pos == len(self.outs), (self.final, self.pos, len(self.outs))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)


def _write_weights(reader: CheckpointReader, steps: list[Step], files: list[Path],
                   shards: list[list[Out]], desc: str, progress: bool) -> None:
    owner = iter([i for i, sh in enumerate(shards) for _ in sh])  # shard of each output, in order
    cur: _ShardFile | None = None
    try:
        with tqdm(total=sum(map(len, shards)), unit="tensor", desc=desc,
                  disable=not progress) as bar:
            for st in steps:
                for t in st.make([reader.read(n) for n in st.inputs]):
                    i = next(owner)
                    if cur is None or cur.final != files[i]:
                        if cur is not None:
                            cur.close()
                        cur = _ShardFile(files[i], shards[i])
                    cur.write(t)
                    bar.update(1)
                if reader.format == "bin":  # unmap: touched pages of a mapped file count as RSS
                    reader.release()
        if cur is not None:
            cur.close()
            cur = None
    finally:
        reader.release()
        if cur is not None:  # an interrupted shard never gets its final name
            cur.f.close()
            cur.tmp.unlink(missing_ok=True)


def _llama_config(raw: dict, cfg: ModelConfig) -> dict:
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "num_hidden_layers", "vocab_size", "max_position_embeddings", "rms_norm_eps",
            "rope_theta", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id")
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    out.update({k: raw[k] for k in keep if k in raw})
    out["num_key_value_heads"] = cfg.num_key_value_heads
    rs = raw.get("rope_scaling")
    out.update(rope_scaling=None if rs is None else {**rs, "rope_type": cfg.rope_scaling.type,
                                                     "type": cfg.rope_scaling.type},
               hidden_act=raw.get("hidden_act", "silu"), attention_bias=False, mlp_bias=False,
               attention_dropout=0.0, head_dim=cfg.head_dim, pretraining_tp=1,
               tie_word_embeddings=cfg.tie_word_embeddings, torch_dtype=cfg.torch_dtype,
               use_cache=True)
    return out


def _internlm2_config(raw: dict, cfg: ModelConfig) -> dict:
    drop = ("auto_map", "attention_bias", "mlp_bias", "head_dim", "pretraining_tp",
            "attention_dropout")
    out = {k: v for k, v in raw.items() if k not in drop}
    rs = raw.get("rope_scaling")
    out.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False,
               rope_scaling=None if rs is None else {"type": cfg.rope_scaling.type,
                                                     "factor": cfg.rope_scaling.factor},
               torch_dtype=cfg.torch_dtype, attn_implementation="eager")
    return out


def _prepare_output(inp: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == inp.resolve():
        raise ConvertError(f"output {out} is the input directory; write somewhere else")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConvertError(f"output {out} is not empty; pass overwrite=true to replace its "
                               f"checkpoint files")
        for p in out.iterdir():  # stale shards/indexes would mix with the new ones
            if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name.endswith(
                    ".index.json") or p.name.startswith(".tmp-")):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def convert(to: str, input: str | Path, output: str | Path, overwrite: bool = False,
            shard_size_mb: float = 2048.0, progress: bool = True) -> Path:
    inp, out = Path(input), Path(output)
    if to not in TARGETS:
        raise ConvertError(f"to: must be one of {', '.join(TARGETS)}; got {to!r}")
    raw_path = inp / "config.json"
    raw = json.loads(raw_path.read_text()) if raw_path.is_file() else None
    if raw is not None and (raw.get("bias") or raw.get("attention_bias") or raw.get("mlp_bias")):
        raise ConvertError(f"{raw_path}: bias=true checkpoints cannot be converted (the layouts "
                           f"carry no bias tensors and no published InternLM2 has them)")
    cfg = ModelConfig.from_dir(inp)
    if cfg.task != "generate":
        raise ConvertError(f"{raw_path}: a {cfg.task} model (InternLM2ForRewardModel) cannot be "
                           "converted: the Llama layout has no v_head")
    reader = CheckpointReader(inp)
    want = {"llama": "internlm2", "internlm2": "llama"}.get(to)
    if want and cfg.layout != want:
        raise ConvertError(f"{raw_path}: to={to} needs a checkpoint in the {want} layout "
                           f"({ARCH[want]}), but this one is {cfg.layout} ({ARCH[cfg.layout]})")
    if to == "safetensors" and reader.format != "bin":
        raise ConvertError(f"{inp}: to=safetensors needs .bin weights; these are already "
                           f".safetensors")
    steps = _plan(reader, cfg, to)
    _prepare_output(inp, out, overwrite)

    shards: list[list[Out]] = [[]]
    for o in (o for st in steps for o in st.outs):  # greedy packing in write order
        if shards[-1] and sum(map(_nbytes, shards[-1])) + _nbytes(o) > shard_size_mb * 2**20:
            shards.append([])
        shards[-1].append(o)
    total = len(shards)
    files = [out / f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    weight_map = {o[0]: files[i].name for i, sh in enumerate(shards) for o in sh}
    total_size = sum(_nbytes(o) for sh in shards for o in sh)

    _write_weights(reader, steps, files, shards, f"convert to {to}", progress)
    if to == "safetensors":
        shutil.copyfile(raw_path, out / "config.json")
    else:
        conf = _llama_config(raw, cfg) if to == "llama" else _internlm2_config(raw, cfg)
        (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    for name in COPIED:
        if (inp / name).is_file():
            if name == "tokenizer_config.json" and to != "safetensors":
                tc = json.loads((inp / name).read_text(encoding="utf-8"))
                tc.pop("auto_map", None)
                (out / name).write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
            else:
                shutil.copyfile(inp / name, out / name)
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / (INDEX + ".tmp")).write_text(json.dumps(index, indent=2) + "\n")
    os.replace(out / (INDEX + ".tmp"), out / INDEX)
    return out
