"""ModelConfig: the facts of one checkpoint, read from its own config.json.

The InternLM2 config class shipped with the checkpoints has defaults that are wrong for
every published model (bias=True, rope_theta=10000, vocab 103168, eps 1e-6), so nothing
here falls back to those: required fields must be in config.json. `auto_map` is ignored
and no code from the checkpoint directory is ever imported.

Published sizes (all: 8 KV heads, head_dim 128, vocab 92544, rope_theta 1e6, 32768 positions,
rms_norm_eps 1e-5, bias false, untied embeddings):
    1.8B: hidden 2048, 16 heads, 24 layers, ffn 8192
    7B:   hidden 4096, 32 heads, 32 layers, ffn 14336
    20B:  hidden 6144, 48 heads, 48 layers, ffn 16384

Torch-free (torch is imported only to turn a dtype name into a torch dtype), like the job's own
configuration: the driver and the tools read a checkpoint's facts without the model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from internlm2_tp.config_forms import TASKS, architecture, rope_fields
from internlm2_tp.errors import ConfigError, JobConfigError, UserError

if TYPE_CHECKING:
    import torch

# The dtypes a model runs in (model.dtype, a checkpoint's torch_dtype), with their sizes.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

# Weight layouts we read: the native one and the Llama layout written by our converter (or
# InternLM's own conversion tool); which architecture uses which: config_forms.ARCHITECTURES.
LAYOUTS = ("internlm2", "llama")


@dataclass(frozen=True)
class RopeScaling:
    type: str  # "linear" or "dynamic" (NTK-aware, as the official InternLM2 code)
    factor: float

    def __post_init__(self) -> None:
        if self.type not in ("linear", "dynamic"):
            raise ConfigError(f"rope_scaling.type must be 'linear' or 'dynamic', got {self.type!r}")
        if not self.factor >= 1.0:
            raise ConfigError(f"rope_scaling.factor must be >= 1, got {self.factor!r}")


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    bias: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = 2
    layout: str = "internlm2"  # which weight names the checkpoint uses
    task: str = "generate"     # "reward": v_head (hidden -> 1) instead of the LM head
    reward_token_id: int | None = None   # appended to each row a reward model scores
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        where = f"{self.source}: "
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "num_hidden_layers", "vocab_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{where}{name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{where}hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{where}num_attention_heads {self.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{where}head_dim {self.head_dim} must be even for rotary embeddings")
        if self.bias:
            raise ConfigError(f"{where}bias=true is not supported (no published InternLM2 uses it)")
        if self.torch_dtype not in DTYPE_BYTES:
            raise ConfigError(f"{where}torch_dtype must be one of {sorted(DTYPE_BYTES)}, "
                              f"got {self.torch_dtype!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"{where}rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"{where}rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.eos_token_id:
            raise ConfigError(f"{where}eos_token_id must name at least one token")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{where}unknown layout {self.layout!r}")
        if self.task not in TASKS:
            raise ConfigError(f"{where}unknown task {self.task!r}")
        r = self.reward_token_id
        if self.task == "reward" and (not isinstance(r, int) or isinstance(r, bool)
                                      or not 0 <= r < self.vocab_size):
            raise ConfigError(f"{where}reward_token_id must be a token id in [0, "
                              f"{self.vocab_size}) for a reward model, got {r!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def valid_tp_degrees(self, limit: int = 64) -> list[int]:
        return [tp for tp in range(1, limit + 1) if tp_error(self, tp) is None]

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        p = Path(path) / "config.json"
        if not Path(path).is_dir():
            raise ConfigError(f"model.path {str(path)!r} is not a directory")
        if not p.is_file():
            raise ConfigError(f"{p}: config.json is missing; model.path must be a Hugging Face "
                              "checkpoint directory")
        raw = read_json_object(p, ConfigError)
        gen = Path(path) / "generation_config.json"
        gen_eos = None
        if gen.is_file():
            try:
                gen_eos = json.loads(gen.read_text()).get("eos_token_id")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{gen}: cannot read generation_config.json: {e}") from e
        return cls.from_dict(raw, source=str(p), generation_eos=gen_eos)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>",
                  generation_eos: Any = None) -> "ModelConfig":
        layout, task = architecture(raw, source)
        theta, rs = rope_fields(raw, source)
        required = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                    "vocab_size", "rms_norm_eps", "max_position_embeddings")
        missing = [k for k in required if k not in raw] + (["rope_theta"] if theta is None else [])
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {missing} (the config class "
                              "defaults are wrong for the published models, so none is assumed)")
        if rs is not None:
            if not isinstance(rs, dict) or "factor" not in rs:
                raise ConfigError(f"{source}: rope_scaling must be null or "
                                  f'{{"type": "dynamic"|"linear", "factor": f}}, got {rs!r}')
            kind = rs.get("type", rs.get("rope_type"))
            rs = RopeScaling(type=kind, factor=float(rs["factor"]))
        eos = generation_eos if generation_eos is not None else raw.get("eos_token_id", 2)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        # Merge the model's own eos with generation_config's list (chat models add <|im_end|>).
        base_eos = raw.get("eos_token_id", 2)
        for e in base_eos if isinstance(base_eos, list) else [base_eos]:
            if int(e) not in eos_ids:
                eos_ids = (int(e),) + eos_ids
        return cls(
            hidden_size=raw["hidden_size"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            vocab_size=raw["vocab_size"],
            rms_norm_eps=float(raw["rms_norm_eps"]),
            rope_theta=float(theta),
            max_position_embeddings=raw["max_position_embeddings"],
            rope_scaling=rs,
            bias=bool(raw.get("bias", raw.get("attention_bias", False))),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            bos_token_id=int(raw.get("bos_token_id", 1)),
            eos_token_id=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
            layout=layout,
            task=task,
            reward_token_id=raw.get("reward_token_id"),
            source=source,
        )


def read_json_object(path: Path, error: type[UserError]) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, adapter_config.json), or `error`
    naming the file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: cannot read {path.name}: {e}") from e
    if not isinstance(raw, dict):
        raise error(f"{path}: {path.name} must hold a JSON object")
    return raw


def tp_error(cfg: ModelConfig, tp: int) -> str | None:
    """Why `tp` cannot shard this model, or None when it can.

    A rank must hold whole KV groups (tp divides the KV heads), or, past the KV head count,
    an equal share of one group's q heads with that group's KV head replicated
    (tp a multiple of the KV heads). Either way tp must divide the q heads.
    """
    if tp < 1:
        return "tensor parallel degree must be >= 1"
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if h % tp:
        return f"tp={tp} does not divide the {h} attention heads"
    if kv % tp and tp % kv:
        return f"tp={tp} neither divides nor is a multiple of the {kv} KV heads"
    return None


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    """KV heads one rank holds: its share of them, or one replicated head once tp exceeds them
    (so the per-rank KV cache stops shrinking past tp = kv_heads)."""
    return max(1, kv_heads // tp)


def check_tp(cfg: ModelConfig, tp: int) -> None:
    err = tp_error(cfg, tp)
    if err:
        raise ConfigError(f"parallel.tp: {err}; valid degrees for {cfg.source}: "
                          f"{cfg.valid_tp_degrees()}")


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it, torch's
    bf16 and fp16 matmuls are emulated and ~100x slower than fp32 (0.4 GFLOP/s measured on an
    AVX2-only EPYC), so fp32 is the only fast dtype there."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name of DTYPE_BYTES."""
    import torch
    return getattr(torch, name)


def check_task_setting(name: str) -> None:
    if name != "auto" and name not in TASKS:
        raise JobConfigError(f"model.task must be auto, {', '.join(TASKS)}; got {name!r}")


def with_task(cfg: ModelConfig, setting: str) -> ModelConfig:
    """The config as model.task says: `auto` keeps what `architectures` says; `reward` reads a
    checkpoint as a reward model (its config.json must give reward_token_id, its weights a
    v_head.weight); `generate` on a reward model is refused: it has no LM head."""
    check_task_setting(setting)
    if setting in ("auto", cfg.task):
        return cfg
    if setting == "generate":
        raise ConfigError(f"model.task=generate, but {cfg.source} is a reward model "
                          "(InternLM2ForRewardModel: a v_head, no LM head to generate with)")
    return replace(cfg, task=setting)


def check_dtype_setting(name: str, key: str = "model.dtype") -> None:
    if name != "auto" and name not in DTYPE_BYTES:
        raise JobConfigError(f"{key} must be auto, {', '.join(DTYPE_BYTES)}; got {name!r}")


def resolve_dtype(name: str, cfg: ModelConfig, device_type: str) -> torch.dtype:
    """`auto` takes the checkpoint's dtype, except on a CPU, where half precision is only worth
    it with native bf16: then fp16 checkpoints run in bf16 (fp16 matmul is unusably slow on
    CPUs), and without native bf16 every half-precision checkpoint runs in fp32."""
    check_dtype_setting(name)
    if name != "auto":
        return torch_dtype(name)
    if device_type != "cpu" or cfg.torch_dtype == "float32":
        return torch_dtype(cfg.torch_dtype)
    return torch_dtype("bfloat16" if cpu_has_fast_bf16() else "float32")
