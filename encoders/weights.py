"""Reading weight files of other projects, and strict key/shape checks that name every mismatch."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import torch

from mcomp.io import load_tensors

logger = logging.getLogger(__name__)

# transformers checkpoint files, in the order transformers itself prefers them
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def hf_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight file(s) of a transformers model directory (single file or sharded with an index)."""
    folder = Path(folder)
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    for name in HF_INDEX_FILES:
        index = folder / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a valid weight index ({err})") from None
            return [folder / f for f in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"{folder}: no weights found (looked for {', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})")


def read_hf_weights(folder: str | os.PathLike, keep: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a transformers model directory; pickles only through `weights_only=True`.

    `keep`: key prefixes to retain (others are dropped while reading, to save memory).
    """
    prefixes = tuple(keep) if keep is not None else None
    out: dict[str, torch.Tensor] = {}
    for path in hf_weight_files(folder):
        tensors = load_tensors(path)
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
            if prefixes is None or key.startswith(prefixes):
                out[key] = value
    return out


def read_json(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
