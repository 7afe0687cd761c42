#!/usr/bin/env python
"""Convert a checkpoint, streamed tensor by tensor (see internlm2_tp/tools/convert.py).

    python jobs/convert.py to=llama input=/ckpt/internlm2-chat-7b output=/ckpt/chat-7b-llama
    python jobs/convert.py to=internlm2 input=LLAMA_DIR output=DIR
    python jobs/convert.py to=safetensors input=BIN_DIR output=DIR \
        [overwrite=true] [shard_size_mb=2048] [progress=false]

Unknown keys and wrong types are refused naming the key. The output must be empty unless
overwrite=true (which replaces the weight files and index it holds).
"""
from __future__ import annotations

import sys

from internlm2_tp.cli import main_guard


def main(argv: list[str]) -> int:
    from internlm2_tp.tools.convert import convert, parse_args

    args = parse_args(argv)
    out = convert(args.to, args.input, args.output, overwrite=args.overwrite,
                  shard_size_mb=args.shard_size_mb, progress=args.progress)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 2**20:.1f} MiB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main, sys.argv[1:]))
