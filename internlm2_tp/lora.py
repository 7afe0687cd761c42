"""PEFT LoRA adapters (XTuner's, or peft's own) merged into each rank's weight slices at load.

An adapter directory holds `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
use_rslora) and `adapter_model.safetensors` (or `.bin`) with, per targeted linear `X.weight` of
the checkpoint, `base_model.model.X.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. The
merged weight is W + scale * B @ A, scale = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora). A rank reads W's block [rows, cols] and merges B[rows] @ A[:, cols] into it: the
same block of B @ A, so every slicing rule of the layers (wqkv's KV groups, w1/w3 into w13,
row-parallel columns, the vocab rows of the head, either layout) holds for the adapter as for
the weights, and each rank reads only its slices of the adapter too (safe_open get_slice).

Everything that would make the merge mean something else than PEFT's forward is refused before
any weight is read, naming the field or the tensor.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from internlm2_tp.checkpoint import CheckpointReader, Range
from internlm2_tp.config import read_json_object
from internlm2_tp.errors import CheckpointError

CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
# The linear layers a LoRA may target, per layout (the module name's last part).
TARGETS = {"internlm2": ("wqkv", "wo", "w1", "w2", "w3", "output"),
           "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj", "lm_head")}
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
# Fields whose non-empty value changes what the adapter computes beyond W + scale * B @ A.
_REFUSED = {"use_dora": "DoRA (a magnitude vector) cannot be merged as B @ A",
            "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights) is not the "
                              "layout of InternLM2's linear layers",
            "lora_bias": "a trained LoRA bias has nowhere to go: the layers have no bias",
            "modules_to_save": "full copies of modules are not merged",
            "rank_pattern": "per-module ranks are not supported",
            "alpha_pattern": "per-module alphas are not supported",
            "alora_invocation_tokens": "activated LoRA applies only after its invocation "
                                       "tokens, which a merge cannot express",
            "use_qalora": "QA-LoRA pools its inputs",
            "target_parameters": "it adapts parameters, not the linear layers merged here",
            "trainable_token_indices": "trained token rows are not merged",
            "layer_replication": "layer replication changes the model's depth"}


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    rslora: bool

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def read_settings(path: Path, layout: str) -> LoraSettings:
    """adapter_config.json, checked: a LoRA whose merge is W + scale * B @ A on our modules."""
    f = path / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"model.lora {str(path)!r}: {CONFIG_FILE} is missing (a PEFT "
                              "adapter directory holds it beside adapter_model.safetensors)")
    raw = read_json_object(f, CheckpointError)
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{f}: peft_type must be LORA, got {raw.get('peft_type')!r}")
    for key, why in _REFUSED.items():
        if raw.get(key):
            raise CheckpointError(f"{f}: {key}={raw[key]!r} is refused: {why}")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{f}: bias={raw['bias']!r} is refused: trained biases have "
                              "nowhere to go (the layers have no bias); only bias 'none'")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    ours = TARGETS[layout]
    if not isinstance(targets, list) or not targets:
        raise CheckpointError(f"{f}: target_modules must list module names, got {targets!r}")
    unknown = [t for t in targets if t not in ours]
    if unknown:
        raise CheckpointError(f"{f}: target_modules {unknown} are not linear layers of a "
                              f"{layout}-layout checkpoint (those are {list(ours)})")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{f}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise CheckpointError(f"{f}: lora_alpha must be a positive number, got {alpha!r}")
    return LoraSettings(r, float(alpha), bool(raw.get("use_rslora", False)))


class LoraAdapter:
    """An adapter checked against the base checkpoint (headers only): `pairs` maps each
    targeted base tensor to its (A, B) names in `weights`."""

    def __init__(self, path: str | Path, layout: str, base: CheckpointReader):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model.lora {str(path)!r} is not a directory")
        self.settings = read_settings(self.path, layout)
        self.weights = CheckpointReader(self.path)
        self.pairs: dict[str, tuple[str, str]] = {}
        found: dict[str, dict[str, str]] = {}
        for name in self.weights.names():
            m = _KEY.match(name)
            if m is None:
                raise CheckpointError(f"{self.weights.file_of(name)}: tensor {name} is not a "
                                      "LoRA A/B matrix of a linear layer "
                                      "(base_model.model.<module>.lora_A|lora_B.weight)")
            found.setdefault(m.group(1) + ".weight", {})[m.group(2)] = name
        for target, ab in sorted(found.items()):
            self._check(target, ab, base, layout)
            self.pairs[target] = (ab["A"], ab["B"])
        if not self.pairs:
            raise CheckpointError(f"model.lora {str(path)!r}: the adapter holds no LoRA tensors")

    def _check(self, target: str, ab: dict[str, str], base: CheckpointReader,
               layout: str) -> None:
        where = self.weights.file_of(next(iter(ab.values())))
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{where}: {target} has lora_{next(iter(ab))} without "
                                  f"lora_{'B' if 'A' in ab else 'A'}")
        module = target.removesuffix(".weight").rsplit(".", 1)[-1]
        if module not in TARGETS[layout] or not base.has(target):
            raise CheckpointError(f"{where}: tensor {ab['A']} adapts {target}, which is not a "
                                  f"linear layer of the checkpoint ({list(TARGETS[layout])})")
        out, inp = base.shape(target)
        r = self.settings.r
        for key, want in (("A", (r, inp)), ("B", (out, r))):
            got = self.weights.shape(ab[key])
            if tuple(got) != want:
                raise CheckpointError(f"{where}: tensor {ab[key]} has shape {list(got)}; "
                                      f"{target} [{out}, {inp}] with r={r} needs {list(want)}")
            self.weights.expect_shape(ab[key], want)   # and a float weight

    def sha256(self) -> str:
        """Of the config and every weight file: what the output's fingerprint holds."""
        h = hashlib.sha256((self.path / CONFIG_FILE).read_bytes())
        for f in sorted(set(self.weights.weight_map.values())):
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()

    def delta(self, name: str, rows: Range | None, cols: Range | None) -> torch.Tensor | None:
        """scale * B[rows] @ A[:, cols] in fp32 for tensor `name` (None: not adapted)."""
        pair = self.pairs.get(name)
        if pair is None:
            return None
        a = self.weights.read(pair[0], cols=cols).float()                  # [r, in_slice]
        b = self.weights.read(pair[1], rows=rows).float()                  # [out_slice, r]
        return (b @ a).mul_(self.settings.scale)


class MergingReader:
    """A CheckpointReader whose reads of adapted tensors come back merged (fp32: the layer's
    copy into its weight rounds once, to the run's dtype)."""

    def __init__(self, base: CheckpointReader, adapter: LoraAdapter):
        self.base, self.adapter = base, adapter

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def read(self, name: str, rows: Range | None = None, cols: Range | None = None
             ) -> torch.Tensor:
        w = self.base.read(name, rows, cols)
        d = self.adapter.delta(name, rows, cols)
        return w if d is None else w.float().add_(d)

    def release(self) -> None:
        self.base.release()
        self.adapter.weights.release()
