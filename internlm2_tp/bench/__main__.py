"""`python -m internlm2_tp.bench RUNNER ARGS.json`: one measurement in this fresh process,
printed as one `BENCH_RESULT {json}` line (jobs/benchmark.py starts one process per runner)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from internlm2_tp.bench.hf import run_hf
    from internlm2_tp.bench.job import run_job
    from internlm2_tp.bench.ours import run_ours

    runners = {"ours": run_ours, "hf": run_hf, "job": run_job}
    if len(argv) != 2 or argv[0] not in runners:
        print(f"usage: python -m internlm2_tp.bench {{{','.join(runners)}}} ARGS.json",
              file=sys.stderr)
        return 2
    result = runners[argv[0]](json.loads(Path(argv[1]).read_text()))
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
