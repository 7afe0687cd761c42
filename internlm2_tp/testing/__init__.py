"""Fixtures for tests, demos and device checks, not used by the job itself: tiny checkpoints in the
published layout (tiny), the tokenizer files and the stand-in tokenizer trained when the real one
is absent (tokenizer_files), the demo's data (demo), and the torch_npu stand-in that enforces each
op's documented contract on CPU (fake_torch_npu)."""
