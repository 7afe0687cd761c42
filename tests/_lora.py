"""LoRA adapters for tests, written by peft itself (as XTuner does) when it is installed, else in
PEFT's documented file layout; and an independent merge of one into a copy of a checkpoint, in
plain torch (none of internlm2_tp.lora)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from reference import raw_state_dict

PREFIX = "base_model.model."


def _skeleton(shapes: dict[str, tuple[int, int]]) -> nn.Module:
    """Empty linear modules at the checkpoint's own dotted names (what PEFT targets)."""
    root = nn.Module()
    for name, (out, inp) in shapes.items():
        parts = name.removesuffix(".weight").split(".")
        m = root
        for p in parts[:-1]:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        m.add_module(parts[-1], nn.Linear(inp, out, bias=False))
    return root


def write_adapter(out: Path, ckpt: Path, targets: list[str], r: int = 4, alpha: float = 8.0,
                  rslora: bool = False, seed: int = 0) -> Path:
    """An adapter of every `targets` module of `ckpt`, with A and B random (seeded) so that
    merging it changes the model's tokens."""
    sd = raw_state_dict(ckpt)
    shapes = {k: tuple(v.shape) for k, v in sd.items()
              if v.dim() == 2 and k.removesuffix(".weight").rsplit(".", 1)[-1] in targets}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (o, i) in sorted(shapes.items()):
        base = PREFIX + name.removesuffix(".weight")
        tensors[base + ".lora_A.weight"] = torch.randn(r, i, generator=g) / i ** 0.5
        tensors[base + ".lora_B.weight"] = torch.randn(o, r, generator=g) * (0.5 / r ** 0.5)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:   # PEFT's documented layout, written directly
        out.mkdir(parents=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets,
            "use_rslora": rslora, "bias": "none", "fan_in_fan_out": False, "use_dora": False}))
        return out
    model = get_peft_model(_skeleton(shapes), LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
        init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.replace(".default", "")
            if key in tensors:
                p.copy_(tensors.pop(key))
    assert not tensors, f"peft made no parameter for {sorted(tensors)[:3]}"
    model.save_pretrained(str(out))
    return out


def merged_copy(ckpt: Path, adapter: Path, out: Path) -> Path:
    """`ckpt` with W + scale * B @ A merged into every adapted weight (fp32), as one file."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    sd = {k: v.float() for k, v in raw_state_dict(ckpt).items()}
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            name = key[len(PREFIX):-len(".lora_A.weight")] + ".weight"
            b = lora[key.replace("lora_A", "lora_B")]
            sd[name] = sd[name] + scale * (b.float() @ a.float())
    out.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.suffix not in (".safetensors", ".bin") and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    save_file(sd, str(out / "model.safetensors"))
    return out
