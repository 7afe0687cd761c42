"""Weight files of a Hugging Face checkpoint and per-rank slice reads.

A rank asks for the rows/columns it owns and gets exactly those: `.safetensors` through
`safe_open(...).get_slice`, opened per tensor so pages mapped for one tensor are released
before the next (a row-parallel column slice touches every page of its tensor); `.bin` through
`torch.load(mmap=True, weights_only=True)` (weights_only refuses pickles that would run code),
one file mapped at a time.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from internlm2_tp.errors import CheckpointError

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}
# Buffers some published .bin files carry; they are recomputed, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Range = tuple[int, int]


def _safetensors_header(path: Path) -> dict[str, dict]:
    """Parse the header ourselves: shapes and dtypes without mapping the file, and a cheap
    truncation check (the data offsets must fit in the file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: {size} bytes, the header "
                              f"needs {8 + n + end}")
    return header


def _why(e: BaseException) -> str:
    """The telling line of a loader error (torch's weights_only refusal is a page of advice
    around one line naming the forbidden global)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return next((x for x in lines if "GLOBAL" in x), lines[0] if lines else type(e).__name__)


class CheckpointReader:
    """Maps tensor names to files and reads (slices of) tensors on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.weight_map: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self.format = self._discover()

    # -- discovery -------------------------------------------------------------------------
    def _discover(self) -> str:
        index = next((self.path / n for n in INDEX_NAMES if (self.path / n).is_file()), None)
        if index is not None:
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (OSError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{index}: not a valid index json ({e!r})") from e
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
            for name, fname in wm.items():
                # A plain file name inside the directory, checked by name, not by resolving: a
                # Hugging Face cache snapshot holds symlinks into ../../blobs, which are fine,
                # while "../x" or "/x" in an index would read a file the checkpoint does not own.
                if not isinstance(fname, str) or fname in ("", ".", "..") or \
                        Path(fname).name != fname or "\\" in fname:
                    raise CheckpointError(f"{index}: tensor {name} points outside the checkpoint "
                                          f"directory: {fname!r}")
                f = self.path / fname
                if not f.is_file():
                    raise CheckpointError(f"{index}: tensor {name} is in {fname}, which is missing")
                self.weight_map[name] = f
        else:
            files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("*.bin"))
            files = [f for f in files if f.name != "training_args.bin"]
            if not files:
                raise CheckpointError(f"{self.path}: no weight files (*.safetensors or *.bin, "
                                      f"or an index json {INDEX_NAMES})")
            for f in files:
                for name in self._file_names(f):
                    self.weight_map[name] = f
        kinds = {f.suffix for f in self.weight_map.values()}
        if len(kinds) != 1 or not kinds <= {".safetensors", ".bin"}:
            raise CheckpointError(f"{self.path}: weight files must be all .safetensors or all "
                                  f".bin, found {sorted(kinds)}")
        fmt = kinds.pop()[1:]
        if fmt == "safetensors":
            for f in sorted(set(self.weight_map.values())):
                header = _safetensors_header(f)
                for name, info in header.items():
                    if self.weight_map.get(name) == f:
                        dt = SAFETENSORS_DTYPES.get(info["dtype"])
                        if dt is None:
                            raise CheckpointError(f"{f}: tensor {name} has unsupported dtype "
                                                  f"{info['dtype']}")
                        self._meta[name] = (tuple(info["shape"]), dt)
            lost = [n for n in self.weight_map if n not in self._meta]
            if lost:
                raise CheckpointError(f"index names tensor(s) {lost[:5]} but "
                                      f"{self.weight_map[lost[0]]} does not contain them")
        return fmt

    def _file_names(self, f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            return list(_safetensors_header(f))
        return list(self._load_bin(f))

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is not None and self._bin_cache[0] == f:
            return self._bin_cache[1]
        self._bin_cache = None  # drop the previous file's mapping first
        try:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                # legacy (non-zip) torch.save format cannot be mapped
                sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, zip errors...
            raise CheckpointError(f"{f}: refused or unreadable .bin (only plain tensors are "
                                  f"accepted, weights_only=True): {_why(e)}") from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{f}: a .bin weight file must hold a dict of tensors")
        self._bin_cache = (f, sd)
        return sd

    # -- queries -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [n for n in self.weight_map if not n.endswith(IGNORED_SUFFIXES)]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> Path:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint")
        return self.weight_map[name]

    def _bin_tensor(self, name: str) -> torch.Tensor:
        f = self.file_of(name)
        sd = self._load_bin(f)
        if name not in sd:
            raise CheckpointError(f"{f}: the index puts tensor {name} in this file, which does "
                                  "not contain it")
        return sd[name]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._meta:
            return self._meta[name][0]
        return tuple(self._bin_tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._meta:
            return self._meta[name][1]
        return self._bin_tensor(name).dtype

    def _expect_float(self, name: str, dtype: torch.dtype) -> None:
        # Model weights are floating point; an integer (or quantized) tensor would be silently
        # converted by copy_() into garbage weights, so it is refused, naming the tensor.
        if not dtype.is_floating_point or dtype.itemsize < 2:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name} has dtype "
                                  f"{str(dtype).replace('torch.', '')}, expected a floating-point "
                                  "weight (float32, bfloat16, float16)")

    def expect_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Check a tensor's full shape against the config (and that it is a float weight)."""
        got = self.shape(name)
        if got != tuple(shape):
            raise CheckpointError(f"{self.file_of(name)}: tensor {name} has shape {list(got)}, "
                                  f"the config needs {list(shape)}")
        self._expect_float(name, self.dtype(name))

    def read(self, name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        """The [rows, cols] block of tensor `name` (whole dims when None), as a new tensor."""
        f = self.file_of(name)
        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        try:
            self._expect_float(name, self.dtype(name))
            if f.suffix == ".safetensors":
                with safe_open(f, framework="pt") as h:
                    sl = h.get_slice(name)
                    return sl[r] if len(self.shape(name)) == 1 else sl[r, c]
            t = self._bin_tensor(name)
            return (t[r] if t.dim() == 1 else t[r, c]).clone()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - name the tensor and file on any read failure
            raise CheckpointError(f"{f}: cannot read tensor {name}: {e}") from e

    def release(self) -> None:
        self._bin_cache = None

    def total_bytes(self) -> int:
        return sum(os.path.getsize(f) for f in set(self.weight_map.values()))
