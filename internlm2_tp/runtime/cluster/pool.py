"""What the driver needs of its tensor-parallel groups, whoever runs them (Ray actors: ray_pool;
torchrun's ranks: torchrun_pool): the Pool protocol and the typed answer of a wait."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from internlm2_tp.engine.engine import Finished
    from internlm2_tp.runtime.metrics import MetricsSink
    from internlm2_tp.runtime.data.rows import Request


@dataclass
class GroupResult:
    """One group's answer to a run: rank 0's finished rows and the run's stats, or the error
    that failed the group (rebuild it and rerun its unfinished rows)."""
    group: int
    finished: list[Finished] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = None
    rejoined: bool = False   # a replacement for a lost group is ready (Ray pools)


class Pool(Protocol):
    """Tensor-parallel groups the driver feeds."""
    num_groups: int

    def start(self) -> list[dict]: ...                        # rank 0's report of each group
    def submit(self, g: int, requests: list[Request], return_after: int) -> None: ...
    def wait(self) -> GroupResult: ...                         # the next group to answer
    def restart(self, g: int) -> dict: ...
    def shutdown(self) -> None: ...
    def metrics_sink(self, output: str) -> MetricsSink | None: ...   # live figures, if any
