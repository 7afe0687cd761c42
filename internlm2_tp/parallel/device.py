"""Compatibility names for code written against the old device module: the platform layer is
`internlm2_tp.parallel.platform` (one class per device kind), the group `parallel.group`.
New code imports from those; this module only re-exports them."""
from __future__ import annotations

from internlm2_tp.parallel.group import TPGroup, destroy_tp_group, free_port, init_tp_group
from internlm2_tp.parallel.platform import DeviceError

__all__ = ["DeviceError", "TPGroup", "destroy_tp_group", "free_port", "init_tp_group"]
