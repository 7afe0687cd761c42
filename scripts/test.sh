#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite.
# TORCH_SPEC picks the torch build (default: the CPU build torch==2.13.0); on CUDA or Ascend
# machines set it to the build that pairs with the driver / torch_npu.
# scripts/constraints.txt pins every other package to the versions this suite last passed with,
# so a new release upstream cannot turn a fresh machine red without a change here; set
# CONSTRAINTS= (empty) to resolve freely, e.g. when moving the pins forward (README).
set -euo pipefail
cd "$(dirname "$0")/.."
constraints=${CONSTRAINTS-scripts/constraints.txt}
python -m pip install -q --disable-pip-version-check ${constraints:+-c "$constraints"} \
    "${TORCH_SPEC:-torch==2.13.0}" -e ".[test]"
exec python -m pytest -q -p no:cacheprovider "$@"
