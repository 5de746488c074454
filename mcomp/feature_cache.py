"""On-disk cache of encoder features, keyed by encoder fingerprint and media content hash.

Encoders are frozen and shared by every composition of the same modality models, so their
outputs can be reused across runs; projectors differ per model and are applied after the cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from mcomp.io import load_tensors, save_tensors, sha256_file

logger = logging.getLogger(__name__)


class FeatureCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self._file_hashes: dict[tuple[str, float, int], str] = {}

    def _content_hash(self, path: str) -> str:
        st = os.stat(path)
        key = (os.path.abspath(path), st.st_mtime, st.st_size)
        if key not in self._file_hashes:
            self._file_hashes[key] = sha256_file(path)
        return self._file_hashes[key]

    def _path(self, fingerprint: str, source: str) -> Path:
        digest = hashlib.sha256(f"{fingerprint}:{self._content_hash(source)}".encode()).hexdigest()
        return self.root / fingerprint / digest[:2] / f"{digest}.safetensors"

    def get(self, fingerprint: str, source) -> torch.Tensor | None:
        if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
            return None  # only files on disk have a stable identity
        path = self._path(fingerprint, os.fspath(source))
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        return load_tensors(path)["features"]

    def put(self, fingerprint: str, source, features: torch.Tensor) -> None:
        if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
            return
        save_tensors({"features": features.detach().cpu()}, self._path(fingerprint, os.fspath(source)))
