"""On-disk cache of encoder features, keyed by encoder fingerprint, media content hash and the
versions of the code that computed them.

Encoders are frozen and shared by every composition of the same modality models, so their
outputs can be reused across runs; projectors differ per model and are applied after the cache.
Each entry records its key in the safetensors metadata and is checked against it when read, so a
corrupt file, or a foreign one at the same path, is recomputed instead of being used.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mcomp.fingerprint import canonical_json, code_versions
from mcomp.io import save_tensors, sha256_file

logger = logging.getLogger(__name__)

KEY_FORMAT = "mcomp.feature_cache/1"
KEY_VERSIONS = ("mcomp", "torch")  # the code whose numerics the features depend on


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
        self.rejected = 0  # entries present but not matching their key (counted in misses too)
        self.hashes = hashes or ContentHashes()
        versions = code_versions()  # read once: looking versions up costs a metadata scan
        self.versions = {name: versions.get(name, "") for name in KEY_VERSIONS}

    def key(self, fingerprint: str, source) -> dict[str, str] | None:
        """Everything an entry's features depend on; None for a source with no stable identity."""
        digest = self.hashes(source)
        if digest is None:
            return None
        return {"format": KEY_FORMAT, "encoder": fingerprint, "media_sha256": digest, **self.versions}

    def path(self, fingerprint: str, source) -> Path | None:
        """Where the entry of `source` under the encoder `fingerprint` lives (None: not cacheable)."""
        key = self.key(fingerprint, source)
        return None if key is None else self._path(key)

    def _path(self, key: dict[str, str]) -> Path:
        digest = hashlib.sha256(canonical_json(key).encode()).hexdigest()
        return self.root / key["encoder"] / digest[:2] / f"{digest}.safetensors"

    def get(self, fingerprint: str, source) -> torch.Tensor | None:
        key = self.key(fingerprint, source)
        if key is None:
            return None  # only files on disk have a stable identity
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        features = self._read(path, key)
        if features is None:
            self.misses += 1
            self.rejected += 1
            return None
        self.hits += 1
        return features

    def _read(self, path: Path, key: dict[str, str]) -> torch.Tensor | None:
        """The entry's features if its recorded key is `key`; None (with a warning) otherwise."""
        try:
            with safe_open(str(path), framework="pt") as f:
                recorded = f.metadata() or {}
                features = f.get_tensor("features") if "features" in f.keys() else None
        except (SafetensorError, OSError, ValueError) as err:
            logger.warning("feature cache entry %s is unreadable (%s); recomputing it", path, err)
            return None
        wrong = sorted(k for k in key if recorded.get(k) != key[k])
        if wrong or features is None:
            logger.warning(
                "feature cache entry %s is not the entry for this input (%s); recomputing it",
                path,
                "; ".join(f"{k}: {recorded.get(k)!r} there, {key[k]!r} wanted" for k in wrong)
                or "no 'features' tensor",
            )
            return None
        return features

    def put(self, fingerprint: str, source, features: torch.Tensor) -> None:
        key = self.key(fingerprint, source)
        if key is None:
            return
        save_tensors({"features": features.detach().cpu()}, self._path(key), metadata=key)
