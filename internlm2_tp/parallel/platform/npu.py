"""Ascend NPUs (torch_npu), and their emulation on CPU with a torch_npu stand-in."""
from __future__ import annotations

from typing import Any

import torch

from internlm2_tp.errors import DeviceError
from internlm2_tp.parallel.platform.base import Platform


class NpuPlatform(Platform):
    """Ascend NPUs through torch_npu: its fused kernels, HCCL. `emulate=True` with a stand-in
    module keeps the tensors on the CPU and the group on gloo; everything else is unchanged."""
    kind, device_type, backend = "npu", "npu", "hccl"
    visible_env = "ASCEND_RT_VISIBLE_DEVICES"
    noset_env = "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES"
    ray_resource = "NPU"

    def __init__(self, torch_npu: Any = None, emulate: bool = False):
        if emulate and torch_npu is None:
            raise ValueError("NpuPlatform(emulate=True) needs a torch_npu stand-in")
        self._torch_npu, self.emulate = torch_npu, emulate
        if emulate:
            self.device_type, self.backend = "cpu", "gloo"

    @property
    def torch_npu(self) -> Any:
        """The torch_npu module (importing it registers the npu device and hccl with torch)."""
        if self._torch_npu is None:
            try:
                import torch_npu
            except ImportError as e:
                raise DeviceError("parallel.device=npu needs torch_npu (pip install "
                                  "'internlm2-tp[npu]' with the torch_npu build that pairs with "
                                  "your torch and CANN; see docs/DEPLOY_ASCEND.md)") from e
            self._torch_npu = torch_npu
        return self._torch_npu

    def is_available(self) -> bool:
        return bool(self.torch_npu.npu.is_available())

    def device_count(self) -> int:
        return int(self.torch_npu.npu.device_count())

    def set_device(self, index: int) -> None:
        self.torch_npu.npu.set_device(index)

    def parse_visible(self, value: str | None) -> list[str] | None:
        """CANN reads comma-separated decimal ids and stops at the first other character
        ("1, 2" is device 1 alone), and needs them distinct and ascending: refuse the rest."""
        if value is None:
            return None
        var = self.visible_env
        bad = next((i for i, c in enumerate(value) if c not in "0123456789,"), None)
        if bad is not None:
            raise DeviceError(f"{var}={value!r}: {value[bad]!r} at position {bad} is not a digit "
                              f"or comma; CANN stops reading there and would see only "
                              f"{value[:bad]!r}. Write comma-separated ids without spaces")
        ids = value.split(",") if value else []
        if "" in ids:
            raise DeviceError(f"{var}={value!r} has an empty entry; write ids like 0,1,2,3")
        super().parse_visible(value)  # duplicates
        if [int(i) for i in ids] != sorted(int(i) for i in ids):
            raise DeviceError(f"{var}={value!r} must list device ids in ascending order "
                              "(CANN refuses any other order)")
        return ids

    def local_device(self, local_index: int | None = None) -> torch.device:
        device = super().local_device(local_index)
        return torch.device("cpu") if self.emulate else device

    def synchronize(self, device: torch.device) -> None:
        if not self.emulate:
            self.torch_npu.npu.synchronize(device)

    def free_memory(self, device: torch.device) -> int | None:
        return int(self.torch_npu.npu.mem_get_info(device)[0])

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.emulate:
            return host.to(device)
        return host.pin_memory().to(device, non_blocking=True)

    def ray_resources(self, cpus: float) -> tuple[dict[str, float], dict[str, Any]]:
        # The actor asks for the NPU too, so Ray sets ASCEND_RT_VISIBLE_DEVICES for it.
        return {"CPU": cpus, "NPU": 1}, {"num_cpus": cpus, "resources": {"NPU": 1}}

    def job_env(self, parallel: Any) -> dict[str, str]:
        return parallel.hccl_env()

    def model_dtype(self, name: str, cfg: Any) -> torch.dtype:
        """`auto` runs half-precision checkpoints in bf16: InternLM2 was trained in bf16, and the
        vendor's notes for the 910B report fp16 drifting on long generations."""
        if name == "auto" and cfg.torch_dtype in ("float16", "bfloat16"):
            return torch.bfloat16
        return super().model_dtype(name, cfg)

    def ops(self) -> Any:
        from internlm2_tp.ops.npu import NpuOps
        return NpuOps(self.torch_npu)

    def attention(self) -> Any:
        from internlm2_tp.attention.npu_backend import NpuAttention
        return NpuAttention(self.torch_npu, self.to_device)
