"""Tensor sources for the merge engine: what a model is, seen one slice of one tensor at a time.

A source knows every tensor's name, shape and dtype without loading it, and reads a flat
element range `[start, stop)` of one tensor on request. The engine never asks for more than
one chunk per source at a time, so peak memory does not depend on the checkpoint size.

`SafetensorsCheckpoint` reads safetensors files (one file, or shards listed in
`model.safetensors.index.json`). It parses the header itself (the format is an 8-byte
length and a JSON table of offsets) and checks every tensor lies inside its file. The engine
takes slices as `view`s of a memory map of the file: no copy, and the pages count as page
cache, not as the process's private memory. `read`/`read_into` copy a byte range with
`os.preadv` instead, for callers that keep or modify what they read.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mcomp.io import WEIGHT_LAYOUTS, find_weight_files

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SINGLE_NAME, INDEX_NAME = WEIGHT_LAYOUTS["safetensors"]  # what the merge engine writes and reads


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class LowRank:
    """A 2-D task vector held as factors, `left @ right` ((O, r) @ (r, I)): a LoRA update s·B·A."""

    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self):
        if self.left.dim() != 2 or self.right.dim() != 2 or self.left.shape[1] != self.right.shape[0]:
            raise ValueError(
                f"low-rank factors must be (O, r) and (r, I), got {list(self.left.shape)} and {list(self.right.shape)}"
            )

    @classmethod
    def zero(cls, rows: int, cols: int) -> "LowRank":
        """The zero update of a (rows, cols) weight: rank 0 (an adapter that does not touch it)."""
        return cls(torch.zeros(rows, 0), torch.zeros(0, cols))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    def flat(self, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of left @ right (float32), from the rows they lie in."""
        cols = self.shape[1]
        r0, r1 = start // cols, -(-stop // cols)
        rows = (self.left[r0:r1].float() @ self.right.float()).reshape(-1)
        return rows[start - r0 * cols : stop - r0 * cols]


class Source:
    """Interface: `name`, `infos` (tensor name -> TensorInfo), `read(name, start, stop)`."""

    name: str
    infos: dict[str, TensorInfo]

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop) of tensor `key`, in its stored dtype, on the CPU."""
        raise NotImplementedError

    def read_delta(self, key: str, start: int, stop: int, base: torch.Tensor) -> torch.Tensor | None:
        """The task vector slice directly, when the source has it exactly (LoRA); else None."""
        return None

    def low_rank(self, key: str) -> LowRank | None:
        """The task vector of 2-D tensor `key` as factors, when the source holds it so (LoRA); else None."""
        return None

    # whether `read` gives this model's own weights (False for sources whose task vector comes
    # from `read_delta`): only then can the engine hand stored values to a method
    stores_weights: bool = True

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """`read` into `out` (stored dtype, stop - start elements)."""
        out.copy_(self.read(key, start, stop))

    def view(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Like `read`, but may share memory with the source (no copy); the caller must not write
        to it and must not keep it past `close`."""
        return self.read(key, start, stop)

    def close(self) -> None:
        pass


class MemorySource(Source):
    """A state dict in memory; a value may be a `LowRank` (float32 when read)."""

    def __init__(self, tensors: dict[str, torch.Tensor | LowRank], name: str = "model"):
        self.name = name
        self.tensors = tensors
        self.infos = {
            k: TensorInfo(tuple(v.shape), torch.float32 if isinstance(v, LowRank) else v.dtype)
            for k, v in tensors.items()
        }

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        value = self.tensors[key]
        if isinstance(value, LowRank):
            return value.flat(start, stop)
        return value.detach().reshape(-1)[start:stop].cpu()

    def low_rank(self, key: str) -> LowRank | None:
        value = self.tensors[key]
        return value if isinstance(value, LowRank) else None


class ZeroSource(Source):
    """An all-zero float32 model with given shapes (the base when merging task vectors directly)."""

    def __init__(self, infos: dict[str, TensorInfo], name: str = "zero base"):
        self.name = name
        self.infos = {
            k: TensorInfo(v.shape, torch.float32 if v.dtype.is_floating_point else v.dtype) for k, v in infos.items()
        }

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        return torch.zeros(stop - start, dtype=self.infos[key].dtype)


def _read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from None
    return 8 + n, header


class SafetensorsCheckpoint(Source):
    """A checkpoint on disk, read lazily by byte range."""

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(path)
        self.infos = {}
        self._where: dict[str, tuple[int, int]] = {}  # key -> (file index, absolute byte offset)
        self._files = find_weight_files(self.path, formats=("safetensors",))
        self._fds: list[int | None] = [None] * len(self._files)
        self._maps: list[mmap.mmap | None] = [None] * len(self._files)
        for fi, file in enumerate(self._files):
            data_start, header = _read_header(file)
            size = file.stat().st_size
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if key in self.infos:
                    raise ValueError(f"{self.name}: tensor {key!r} appears in two shards")
                if entry["dtype"] not in DTYPES:
                    raise ValueError(f"{file}: tensor {key!r} has unsupported dtype {entry['dtype']}")
                info = TensorInfo(tuple(int(s) for s in entry["shape"]), DTYPES[entry["dtype"]])
                begin, end = entry["data_offsets"]
                if end - begin != info.numel * info.dtype.itemsize:
                    raise ValueError(f"{file}: tensor {key!r} has inconsistent data offsets")
                if data_start + end > size:  # checked here: a mapped read past the end would crash
                    raise ValueError(f"{file}: truncated file (tensor {key!r})")
                self.infos[key] = info
                self._where[key] = (fi, data_start + begin)

    def storage_order(self) -> list[str]:
        """Tensor names in on-disk order (file, then offset): sequential reads."""
        return sorted(self.infos, key=lambda k: self._where[k])

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        out = torch.empty(stop - start, dtype=self.infos[key].dtype)
        self.read_into(key, start, stop, out)
        return out

    def read_into(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        info = self.infos[key]
        fi, offset = self._where[key]
        fd = self._fds[fi]
        if fd is None:
            fd = self._fds[fi] = os.open(self._files[fi], os.O_RDONLY)
        size = info.dtype.itemsize
        count = stop - start
        if count:
            view = memoryview(out.view(torch.uint8).numpy())
            got = os.preadv(fd, [view], offset + start * size)
            if got != count * size:
                raise ValueError(f"{self._files[fi]}: truncated file (tensor {key!r})")

    def view(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of `key` straight from a memory map of its file: no copy, and
        the pages belong to the page cache (not to this process's private memory)."""
        info = self.infos[key]
        fi, offset = self._where[key]
        mapped = self._maps[fi]
        if mapped is None:
            with open(self._files[fi], "rb") as f:
                # copy-on-write: writable for torch, but nothing writes, so no page is ever copied
                mapped = self._maps[fi] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        size = info.dtype.itemsize
        if stop <= start:
            return torch.empty(0, dtype=info.dtype)
        return torch.frombuffer(mapped, dtype=info.dtype, count=stop - start, offset=offset + start * size)

    def close(self) -> None:
        for i, fd in enumerate(self._fds):
            if fd is not None:
                os.close(fd)
                self._fds[i] = None
        # the maps close when the last tensor viewing them is gone
        self._maps = [None] * len(self._maps)

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
