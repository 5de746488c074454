"""Atomic file output and safe weight loading: nothing half-written, nothing unpickled freely."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

from mcomp import faults

logger = logging.getLogger(__name__)


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp (and safetensors' writer) create 0600/0700 whatever the umask; outputs get
    what a plain create gets."""
    os.chmod(path, mode & ~current_umask())


def _follow_umask_tree(root: Path) -> None:
    mask = current_umask()
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        _follow_umask(tmp, 0o666)
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class OutputBusyError(FileExistsError):
    """Another process is writing the same output directory."""


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on output `path` (a `.NAME.lock` file beside it) or fail at once."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(
                f"{path} is being written by another process (it holds {lock}); wait for it or choose another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its last holder unlinked while we waited for it
            break
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def check_apart(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs (replacing it would
    delete or change that input)."""
    target = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            how = "is" if target == source else "contains" if source.is_relative_to(target) else "lies inside"
            raise ValueError(f"output {out} {how} the input {item}; write the output somewhere else")


def _leftovers(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.{TMP_TAG}*"))


TMP_TAG = "mcomp-"


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Build a directory under a temporary name; it appears at `path` only when complete.

    Exclusive: an existing `path` is replaced only with `overwrite`, checked again at the commit;
    a second writer of the same path fails at once (`OutputBusyError`); `path` must not be, contain
    or lie inside any of `inputs`. Leftovers of a killed writer of the same path are removed."""
    path = Path(path)
    check_apart(path, inputs)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (refusing to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        for stale in _leftovers(path):  # whoever made it held this lock and is gone
            logger.warning("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{TMP_TAG}", suffix=".partial", dir=path.parent))
        try:
            yield tmp
            _follow_umask_tree(tmp)
            faults.point("output.commit")
            if path.exists() or path.is_symlink():
                if not overwrite:
                    raise FileExistsError(
                        f"{path} appeared while this output was being written (refusing to overwrite it)"
                    )
                old = path.with_name(f".{path.name}.{TMP_TAG}old")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class NonFiniteError(ValueError):
    """A tensor about to be written holds Inf or NaN."""


def check_finite(name: str, tensor: torch.Tensor, where: str, origin: str = "") -> None:
    """Raise NonFiniteError naming the tensor if a floating-point `tensor` holds Inf or NaN (as stored:
    call it after the cast to the output dtype, where an overflow shows)."""
    if not tensor.is_floating_point():
        return
    # fast path: one reduction with no temporary (the minimum and maximum are NaN when any value
    # is, and ±Inf is one of them when present); the exact count only for the error
    if tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor.reshape(-1))
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    finite = torch.isfinite(tensor)
    bad = int((~finite).sum())
    raise NonFiniteError(
        f"{where}: tensor {name!r} has {bad} Inf/NaN value(s) as {str(tensor.dtype).replace('torch.', '')}"
        f"{f' (from {origin})' if origin else ''}; nothing was written "
        f"(a result that overflows its dtype: write float32 or bfloat16, or lower the weights)"
    )


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None, origin: str = ""
) -> None:
    """Write a safetensors file atomically (contiguous copies; shared storage is not allowed); a
    floating-point tensor holding Inf or NaN is refused (`check_finite`)."""
    flat = {k: v.detach().contiguous() for k, v in tensors.items()}
    for name, value in flat.items():
        check_finite(name, value, str(path), origin)
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)
        _sort_metadata(tmp)
        _follow_umask(tmp, 0o666)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys in sorted order: safetensors writes them in
    hash-map order, which changes from process to process, so the same tensors would not give the
    same bytes. Only the order changes, so the header keeps its length and the data stays in place."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size or raw[len(text) :].strip(b" "):
            raise RuntimeError(f"{path}: unexpected safetensors header layout")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load weights from safetensors, or from a pickle through `weights_only=True` only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device=device)
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # the restricted unpickler refuses arbitrary objects
        raise ValueError(
            f"{path}: refused to load: the file is not a plain tensor pickle "
            f"(torch.load weights_only=True failed: {str(err).splitlines()[0]})"
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


# transformers checkpoint layouts by format: the single file, then the index of shards
WEIGHT_LAYOUTS = {
    "safetensors": ("model.safetensors", "model.safetensors.index.json"),
    "bin": ("pytorch_model.bin", "pytorch_model.bin.index.json"),
}


def find_weight_files(path: str | os.PathLike, formats: Iterable[str] = ("safetensors", "bin")) -> list[Path]:
    """The weight file(s) of a checkpoint: `path` itself when it is a file, else in a directory,
    per format in order, the single file or the shards its index lists (every one present); for
    safetensors also the directory's only *.safetensors file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"model not found: {path}")
    formats = tuple(formats)
    for fmt in formats:
        single, index_name = WEIGHT_LAYOUTS[fmt]
        if (path / single).is_file():
            return [path / single]
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{index}: not a valid weight index ({err})") from None
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: lists shard(s) that do not exist: {missing}")
            return [path / f for f in files]
    if "safetensors" in formats:
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found
        if found:
            raise ValueError(f"{path}: several safetensors files and no index: {[f.name for f in found]}")
    looked = [name for fmt in formats for name in WEIGHT_LAYOUTS[fmt]]
    raise FileNotFoundError(f"{path}: no weights found (looked for {', '.join(looked)})")


def _preview(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...] | torch.Tensor],
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    what: str,
) -> None:
    """Raise ValueError naming every missing key, unexpected key and wrong shape."""

    def shape(v) -> tuple[int, ...]:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: file {shape(state[k])} vs expected {shape(expected[k])}"
        for k in sorted(set(state) & set(expected))
        if shape(state[k]) != shape(expected[k])
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_preview(unexpected)}")
        if wrong:
            parts.append(f"wrong shape for {len(wrong)} key(s): {_preview(wrong, 6)}")
        raise ValueError(f"{source}: {what} weights do not match: " + "; ".join(parts))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
