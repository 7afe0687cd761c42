"""Fixtures for tests and device checks: the torch_npu stand-in (fake_torch_npu.py)."""
