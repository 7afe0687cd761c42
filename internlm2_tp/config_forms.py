"""The forms config.json takes across the InternLM2 family, read into one meaning.

- `architectures`: which weight names the checkpoint uses (its layout) and what it computes (its
  task): InternLM2ForCausalLM and the Llama layout generate; InternLM2ForRewardModel is the same
  decoder with `v_head` (hidden -> 1) instead of the LM head, and scores.
- `model_type`: "internlm2" (and "llama" for the Llama layout); some InternLM2-Math revisions say
  "internlm", accepted only when `architectures` names an InternLM2 class: InternLM (v1) is
  another layout (separate, biased q/k/v projections) that must not be read as this one.
- RoPE: `rope_theta` + `rope_scaling`, or an early internlm2-7b revision's `rotary` dict
  (`{"base": B, "type": "dynamic"|"origin", "scaling_factor": f}`). In the official InternLM
  modeling code that dict builds the rotary embedding: "origin" is unscaled at base B; "dynamic"
  is dynamic NTK at base B with `scaling_factor` (default 1.0), the same formula as
  rope_scaling {"type": "dynamic", "factor": f}. So it is read as rope_theta = B and that
  rope_scaling, and refused (naming the field) where it says anything else, or where
  rope_theta / rope_scaling are also given with another meaning.

Torch-free, like config.py.
"""
from __future__ import annotations

from typing import Any

from internlm2_tp.errors import ConfigError

# Architecture -> (weight layout, task).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "InternLM2ForCausalLM": ("internlm2", "generate"),
    "InternLM2ForRewardModel": ("internlm2", "reward"),
    "LlamaForCausalLM": ("llama", "generate"),
}
MODEL_TYPES = ("internlm2", "internlm", "llama")
TASKS = ("generate", "reward")
_ROTARY_KEYS = {"base", "type", "scaling_factor"}


def architecture(raw: dict[str, Any], source: str) -> tuple[str, str]:
    """(layout, task) from `architectures` and `model_type`."""
    named = raw.get("architectures")
    mtype = raw.get("model_type")
    if mtype is not None and mtype not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {mtype!r} is not one of {list(MODEL_TYPES)}")
    if mtype == "internlm" and not any(a in ARCHITECTURES and a.startswith("InternLM2")
                                       for a in named or []):
        raise ConfigError(f"{source}: model_type 'internlm' is read as InternLM2 only when "
                          f"architectures names InternLM2ForCausalLM or InternLM2ForRewardModel "
                          f"(got architectures {named}); InternLM (v1) is another layout")
    archs = named or ["InternLM2ForCausalLM"]
    found = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if found is None:
        raise ConfigError(f"{source}: architectures {archs} is not one of {sorted(ARCHITECTURES)}")
    return found


def rope_fields(raw: dict[str, Any], source: str) -> tuple[Any, Any]:
    """(rope_theta, rope_scaling as written) from the current fields or the old `rotary` dict;
    rope_theta None when neither gives one."""
    theta, scaling = raw.get("rope_theta"), raw.get("rope_scaling")
    rotary = raw.get("rotary")
    if rotary is None:
        return theta, scaling
    if not isinstance(rotary, dict) or "base" not in rotary:
        raise ConfigError(f"{source}: rotary must be a dict with a 'base' (the old form of "
                          f"rope_theta), got {rotary!r}")
    extra = sorted(set(rotary) - _ROTARY_KEYS)
    if extra:
        raise ConfigError(f"{source}: rotary.{extra[0]} has no known meaning (rotary may hold "
                          f"{sorted(_ROTARY_KEYS)})")
    kind = rotary.get("type", "origin")
    if kind not in ("origin", "dynamic"):
        raise ConfigError(f"{source}: rotary.type must be 'origin' or 'dynamic', got {kind!r}")
    if kind == "origin" and "scaling_factor" in rotary:
        raise ConfigError(f"{source}: rotary.scaling_factor is given with rotary.type 'origin', "
                          "which the official code does not scale")
    base = rotary["base"]
    old = None if kind == "origin" else {"type": "dynamic",
                                         "factor": float(rotary.get("scaling_factor", 1.0))}
    if theta is not None and float(theta) != float(base):
        raise ConfigError(f"{source}: rotary.base {base} and rope_theta {theta} disagree")
    if scaling is not None and _scaling_meaning(scaling) != _scaling_meaning(old):
        raise ConfigError(f"{source}: rotary {rotary} and rope_scaling {scaling} disagree")
    return base, old if scaling is None else scaling


def _scaling_meaning(s: Any) -> Any:
    if not isinstance(s, dict):
        return s
    return (s.get("type", s.get("rope_type")), float(s.get("factor", 1.0)))
