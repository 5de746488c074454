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


class ContentHashes:
    """sha256 of media files, computed once per (path, mtime, size)."""

    def __init__(self):
        self._known: dict[tuple[str, int, int], str] = {}

    def __call__(self, source) -> str | None:
        """The content hash of a file on disk; None for anything else (no stable identity)."""
        if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(source):
            return None
        st = os.stat(source)
        key = (os.path.abspath(source), st.st_mtime_ns, st.st_size)
        if key not in self._known:
            self._known[key] = sha256_file(source)
        return self._known[key]


class FeatureCache:
    def __init__(self, root: str | os.PathLike, hashes: ContentHashes | None = None):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.hashes = hashes or ContentHashes()

    def _path(self, fingerprint: str, source: str) -> Path:
        digest = hashlib.sha256(f"{fingerprint}:{self.hashes(source)}".encode()).hexdigest()
        return self.root / fingerprint / digest[:2] / f"{digest}.safetensors"

    def get(self, fingerprint: str, source) -> torch.Tensor | None:
        if self.hashes(source) is None:
            return None  # only files on disk have a stable identity
        path = self._path(fingerprint, os.fspath(source))
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        return load_tensors(path)["features"]

    def put(self, fingerprint: str, source, features: torch.Tensor) -> None:
        if self.hashes(source) is None:
            return
        save_tensors({"features": features.detach().cpu()}, self._path(fingerprint, os.fspath(source)))
