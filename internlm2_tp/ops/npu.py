"""The Ascend op set: torch_npu's fused kernels, called in the forms their documentation gives
for every torch_npu version the deploy guide supports (Ascend/op-plugin, docs/context/).

Matmul weights stay in their plain layout (F.linear goes to the NPU's own matmul).
"""
from __future__ import annotations

from typing import Any

import torch


class NpuOps:
    name = "npu"

    def __init__(self, torch_npu: Any):
        self.npu = torch_npu

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # torch_npu-npu_rms_norm.md: x 2-8 dims, gamma in x's dtype; returns (y, rstd).
        return self.npu.npu_rms_norm(x, weight, epsilon=eps)[0]

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, d], k [T, KVH, d], cos/sin [T, d] -> rotated q, k (rotate-half).

        torch_npu-npu_rotary_mul.md (7.1.0, 7.2.0): input, r1, r2 are 4-D, layout BSND with
        r1/r2 as 1S1D here; 3-D TND is accepted only from 7.3.0. So B = 1 is added."""
        c, s = cos[None, :, None, :], sin[None, :, None, :]                  # [1, T, 1, d]
        return (self.npu.npu_rotary_mul(q.unsqueeze(0), c, s).squeeze(0),
                self.npu.npu_rotary_mul(k.unsqueeze(0), c, s).squeeze(0))

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        # torch_npu-npu_swiglu.md: swish on the first half of `dim`; contiguous, non-empty.
        return self.npu.npu_swiglu(gate_up, dim=-1)

    def row_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.max(dim=-1)

    def packs_head_weight(self, weight: torch.Tensor) -> bool:
        return False

    def lm_head(self, x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
                workspace: Any = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight)   # the device's allocator caches blocks

    def packs_linear_weight(self, weight: torch.Tensor) -> bool:
        return False

    def pack_linear_weight(self, weight: torch.Tensor) -> torch.Tensor | None:
        return None
