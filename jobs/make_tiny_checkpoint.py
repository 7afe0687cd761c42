#!/usr/bin/env python
"""Write a tiny InternLM2 checkpoint in the published layout.

    python jobs/make_tiny_checkpoint.py out=DIR [hidden_size=192 num_attention_heads=48 ...]

Keys are the fields of internlm2_tp.testing.tiny.TinySpec (unknown keys are refused), e.g.
format=bin, dtype=float32, num_shards=3, rope_scaling='{type: dynamic, factor: 2.0}', reward=true
(an InternLM2ForRewardModel: v_head.weight instead of output.weight, reward_token_id).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from internlm2_tp.testing.tiny import TinySpec, write_tiny_checkpoint


@dataclass
class Args:
    out: str = ""
    spec: TinySpec = field(default_factory=TinySpec)


def main(argv: list[str]) -> int:
    from omegaconf import OmegaConf

    from internlm2_tp.errors import JobConfigError

    # `key=value` for TinySpec fields; `out=` is the destination
    keyed = [a if a.startswith("out=") else f"spec.{a}" for a in argv]
    try:
        args = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Args),
                                                   OmegaConf.from_dotlist(keyed)))
    except Exception as e:  # noqa: BLE001 - OmegaConf and __post_init__ errors alike
        raise JobConfigError(str(e).splitlines()[0].replace("spec.", "")) from e
    if not args.out:
        raise JobConfigError("out=DIR is required")
    out = write_tiny_checkpoint(args.out, args.spec)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    from internlm2_tp.cli import main_guard

    sys.exit(main_guard(main, sys.argv[1:]))
