#!/usr/bin/env bash
# Set up a fresh machine and run the whole test suite.
# TORCH_SPEC picks the torch build (default: the CPU build torch==2.13.0); on CUDA or Ascend
# machines set it to the build that pairs with the driver / torch_npu.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" -e ".[test]"
exec python -m pytest -q -p no:cacheprovider "$@"
