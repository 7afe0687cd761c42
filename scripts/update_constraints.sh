#!/usr/bin/env bash
# Move the pins in scripts/constraints.txt forward: resolve the project's dependencies afresh in a
# new virtual environment (no constraints), write what it resolved, then run the whole suite in
# that environment. Commit the new file only if the suite is green (README, "Moving the pins").
# torch and the packages whose versions torch itself pins stay out: TORCH_SPEC picks the build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-$(mktemp -d)/venv}
python -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "${TORCH_SPEC:-torch==2.13.0}" -e ".[test]"
{
    echo "# Written by scripts/update_constraints.sh on $(date -u +%Y-%m-%d) from a fresh resolve;"
    echo "# used by scripts/test.sh and scripts/demo.sh (pip -c). Do not edit by hand."
    "$venv/bin/python" -m pip freeze --exclude-editable \
        | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|sympy|mpmath|networkx|pip|setuptools|wheel)==' \
        | grep -v '^-e '
} > scripts/constraints.txt
echo "resolved: $(grep -ciE '==' scripts/constraints.txt) packages -> scripts/constraints.txt"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
