"""Streaming safetensors writer: shards whose header is known up front, data appended in order.

The merge engine produces each output tensor slice by slice. Holding a whole shard to call
`safetensors.save_file` would cost a shard's worth of memory, so the writer plans the layout
(names, shapes, dtypes, hence every offset) first, writes each shard's header, then appends
the bytes as they come. The files are standard safetensors (`safe_open` and transformers read
them); the directory they live in is made atomic by the caller (`mcomp.io.atomic_directory`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mcomp import faults
from mcomp.io import check_finite
from mcomp.merge.sources import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME, TensorInfo


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


class ShardedWriter:
    """Write tensors in the declared order into `directory` (shards + index when more than one)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        layout: list[tuple[str, TensorInfo]],
        max_shard_bytes: int,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
        origin: str = "",
    ):
        self.directory = Path(directory)
        self.origin = origin  # the inputs, named in errors
        self.layout = layout
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, TensorInfo]]] = [[]]
        size = 0
        for name, info in layout:
            nbytes = info.numel * info.dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, info))
            size += nbytes
        count = len(shards)
        if count == 1:
            names = [SINGLE_NAME if prefix == "model" else f"{prefix}.safetensors"]
        else:
            names = [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shards = list(zip(names, shards))
        self.total_size = sum(i.numel * i.dtype.itemsize for _, i in layout)
        self._order = [name for name, _ in layout]
        self._infos = dict(layout)
        self._shard_of = {name: si for si, (_, items) in enumerate(self.shards) for name, _ in items}
        self._pos = 0  # index into _order of the tensor being written
        self._written = 0  # elements written of that tensor
        self._file = None
        self._shard = -1

    def _open_shard(self, si: int) -> None:
        if self._file is not None:
            self._file.close()
        fname, items = self.shards[si]
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, info in items:
            nbytes = info.numel * info.dtype.itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.directory / fname, "wb")
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)
        self._shard = si

    def write(self, name: str, flat: torch.Tensor) -> None:
        """Append the next elements of tensor `name` (must be the tensor currently due)."""
        if self._pos >= len(self._order) or self._order[self._pos] != name:
            due = self._order[self._pos] if self._pos < len(self._order) else None
            raise RuntimeError(f"writer: got {name!r} but {due!r} is due")
        info = self._infos[name]
        if flat.dtype != info.dtype:
            raise RuntimeError(f"writer: {name!r} has dtype {flat.dtype}, layout says {info.dtype}")
        if self._shard != self._shard_of[name]:
            self._open_shard(self._shard_of[name])
        data = flat.detach().contiguous().cpu().reshape(-1)
        check_finite(name, data, str(self.directory / self.shards[self._shard][0]), self.origin)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._written += data.numel()
        if self._written > info.numel:
            raise RuntimeError(f"writer: too many elements for {name!r}")
        if self._written == info.numel:
            self._pos += 1
            self._written = 0
            faults.point("merge.tensor_written")

    def close(self) -> None:
        """Finish: check everything was written, close, and write the index if sharded."""
        # tensors with no elements never get a write call
        while self._pos < len(self._order) and self._infos[self._order[self._pos]].numel == 0:
            name = self._order[self._pos]
            if self._shard != self._shard_of[name]:
                self._open_shard(self._shard_of[name])
            self._pos += 1
        if self._pos != len(self._order):
            raise RuntimeError(
                f"writer: {len(self._order) - self._pos} tensor(s) not written, first {self._order[self._pos]!r}"
            )
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: fname for fname, items in self.shards for name, _ in items},
            }
            (self.directory / INDEX_NAME).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
