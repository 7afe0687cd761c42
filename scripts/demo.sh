#!/usr/bin/env bash
# Set up a fresh machine and run the batch job on the embedded default: a tiny random-weight
# InternLM2 checkpoint and a demo Parquet (English, Chinese, chat messages), tp=2 on CPU, local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
constraints=${CONSTRAINTS-scripts/constraints.txt}  # the pinned versions, as scripts/test.sh
python -m pip install -q --disable-pip-version-check ${constraints:+-c "$constraints"} \
    "${TORCH_SPEC:-torch==2.13.0}" -e .
exec python jobs/batch_infer.py parallel.tp=2 "$@"
