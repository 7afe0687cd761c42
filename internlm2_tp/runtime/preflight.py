"""Checks the driver runs before any rank starts: a dry load of the checkpoint.

The model is built on the `meta` device (no memory) and its own loaders run against a reader
that returns empty meta tensors instead of data, so every check the ranks would make (missing
and unexpected tensors, index pointing at a missing file or tensor, shapes, dtypes, truncated
safetensors, a `.bin` whose pickle is refused) fails here, in the driver, naming the file and
the tensor, before the output directory is touched or a group is placed. Only headers (and
`.bin` pickles, memory-mapped) are read; nothing from the checkpoint directory is imported.
"""
from __future__ import annotations

import logging

import torch

from internlm2_tp.checkpoint import CheckpointReader, Range
from internlm2_tp.config import ModelConfig
from internlm2_tp.errors import CheckpointError

log = logging.getLogger(__name__)
META = torch.device("meta")


class _DryReader(CheckpointReader):
    """Answers shapes and dtypes from the files; `read` returns meta tensors of the slice."""

    def read(self, name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        shape = list(self.shape(name))
        self._expect_float(name, self.dtype(name))
        for dim, rng in ((0, rows), (1, cols)):
            if rng is not None and dim < len(shape):
                lo, hi = rng
                if not 0 <= lo <= hi <= shape[dim]:
                    raise CheckpointError(f"{self.file_of(name)}: tensor {name} has shape "
                                          f"{list(self.shape(name))}; dim {dim} has no rows "
                                          f"[{lo}, {hi})")
                shape[dim] = hi - lo
        return torch.empty(shape, dtype=self.dtype(name), device=META)


def check_checkpoint(path: str, cfg: ModelConfig) -> None:
    """Raise CheckpointError naming the file/tensor if the ranks could not load `path`."""
    from internlm2_tp.model import InternLM2Model
    from internlm2_tp.parallel.group import TPGroup

    reader = _DryReader(path)          # index, files, safetensors headers, dtypes, truncation
    try:
        model = InternLM2Model(cfg, TPGroup(), torch.float32, META)
    except Exception as e:  # noqa: BLE001 - the dry run is a convenience; the ranks check too
        log.debug("checkpoint dry run skipped: cannot build the model on meta (%s)", e)
        return
    try:
        model.load_weights(reader)
    finally:
        reader.release()
