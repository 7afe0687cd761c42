"""Op sets: the element-wise kernels the model calls (norm, rotary, swiglu) and how matmul
weights are laid out. The model takes its op set once from the platform (`platform.ops()`):
TorchOps (plain torch; CPU and CUDA) or NpuOps (torch_npu's fused kernels)."""
from __future__ import annotations

from internlm2_tp.ops.torch_ops import (HeadWorkspace, TorchOps, apply_rotary, head_by_weight,
                                        linear, lm_head, pack_linear_weight, packs_linear_weight,
                                        rms_norm, rotate_half, row_max, silu_and_mul)

__all__ = ["HeadWorkspace", "TorchOps", "apply_rotary", "head_by_weight", "linear", "lm_head",
           "pack_linear_weight", "packs_linear_weight", "rms_norm", "rotate_half", "row_max",
           "silu_and_mul"]
