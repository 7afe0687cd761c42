"""`python -m internlm2_tp.bench RUNNER ARGS.json`: one measurement, printed as one BENCH_RESULT
line for jobs/benchmark.py to parse."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from internlm2_tp.bench.runners import RUNNERS

if __name__ == "__main__":
    result = RUNNERS[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text()))
    print("BENCH_RESULT " + json.dumps(result))
