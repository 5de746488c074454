"""Reading weight files of other projects, and strict key/shape checks that name every mismatch."""

from __future__ import annotations

import logging
import os
from typing import Iterable

import torch

from mcomp.io import find_weight_files, load_tensors
from mcomp.resources import read_document

logger = logging.getLogger(__name__)


def read_hf_weights(folder: str | os.PathLike, keep: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a transformers model directory; pickles only through `weights_only=True`.

    `keep`: key prefixes to retain (others are dropped while reading, to save memory).
    """
    prefixes = tuple(keep) if keep is not None else None
    out: dict[str, torch.Tensor] = {}
    for path in find_weight_files(folder):
        tensors = load_tensors(path)
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
            if prefixes is None or key.startswith(prefixes):
                out[key] = value
    return out


def read_json(path: str | os.PathLike, what: str) -> dict:
    return read_document(path, what, dict)
