"""CUDA GPUs."""
from __future__ import annotations

from typing import Any

import torch

from internlm2_tp.parallel.platform.base import Platform


class CudaPlatform(Platform):
    """CUDA GPUs: the plain torch op set and attention (SDPA), NCCL."""
    kind, device_type, backend = "cuda", "cuda", "nccl"
    visible_env, noset_env = "CUDA_VISIBLE_DEVICES", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
    ray_resource = "GPU"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def free_memory(self, device: torch.device) -> int | None:
        return int(torch.cuda.mem_get_info(device)[0])

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return host.pin_memory().to(device, non_blocking=True)

    def ray_resources(self, cpus: float) -> tuple[dict[str, float], dict[str, Any]]:
        return {"CPU": cpus, "GPU": 1}, {"num_cpus": cpus, "num_gpus": 1}
