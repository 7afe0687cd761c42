"""The benchmark behind jobs/benchmark.py: runners for our engine and transformers (runners.py)
and vLLM (vllm_runner.py, run by vLLM's own interpreter), each in a fresh process."""
