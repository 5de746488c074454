"""Encoder features computed once per media file during an evaluation.

`EvalFeatureCache` is what the evaluation sets as `model.feature_cache`: an in-memory LRU layer (so
the options of a question, a generate call and the next question that shows the same file reuse
the features) over an optional on-disk `mcomp.feature_cache.FeatureCache` (so other runs, e.g.
other compositions of the same modality models, re-encode nothing). Keys are the encoder
fingerprint and the file's content hash, as on disk.

Given the model's adapters (`encoders`), a file that no cache holds is encoded on its own when it
is asked for, so its features never depend on which other files were encoded in the same encoder
batch: a run with a warm cache, or one resumed after an interruption, sees the same bits as a cold,
uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Iterable

import torch

from mcomp.errors import MediaBatchError, MediaError
from mcomp.feature_cache import ContentHashes, FeatureCache

logger = logging.getLogger(__name__)


class EvalFeatureCache:
    def __init__(
        self,
        disk: FeatureCache | str | os.PathLike | None = None,
        max_items: int = 64,
        encoders: Iterable | None = None,
    ):
        self.hashes = disk.hashes if isinstance(disk, FeatureCache) else ContentHashes()
        self.disk = FeatureCache(disk, self.hashes) if isinstance(disk, (str, os.PathLike)) else disk
        self.max_items = max_items
        self.encoders = {adapter.fingerprint(): adapter for adapter in (encoders or ())}
        self._memory: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.memory_hits = 0
        self.encoded = 0  # files that had to be run through an encoder

    @property
    def disk_hits(self) -> int:
        return self.disk.hits if self.disk is not None else 0

    def _key(self, fingerprint: str, source) -> tuple[str, str] | None:
        digest = self.hashes(source)
        return None if digest is None else (fingerprint, digest)

    def get(self, fingerprint: str, source) -> torch.Tensor | None:
        key = self._key(fingerprint, source)
        if key is None:
            return None
        if key in self._memory:
            self._memory.move_to_end(key)
            self.memory_hits += 1
            return self._memory[key]
        feats = self.disk.get(fingerprint, source) if self.disk is not None else None
        if feats is not None:
            self._remember(key, feats)
            return feats
        return self._encode_alone(fingerprint, source)

    def _encode_alone(self, fingerprint: str, source) -> torch.Tensor | None:
        """Features of `source` from a batch of one (None: no known encoder, or the file does not
        decode; the model then reports the failure with the rest of its batch)."""
        adapter = self.encoders.get(fingerprint)
        if adapter is None:
            return None
        try:
            tensors = adapter.input_tensors([source])
        except (MediaBatchError, MediaError):
            return None
        (feats,) = adapter.encode_tensors(tensors)
        self.put(fingerprint, source, feats)
        return feats

    def put(self, fingerprint: str, source, features: torch.Tensor) -> None:
        key = self._key(fingerprint, source)
        if key is None:
            return
        self.encoded += 1
        self._remember(key, features.detach())
        if self.disk is not None:
            self.disk.put(fingerprint, source, features)

    def _remember(self, key, feats: torch.Tensor) -> None:
        if self.max_items <= 0:
            return
        self._memory[key] = feats
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_items:
            self._memory.popitem(last=False)

    def stats(self) -> dict[str, int]:
        return {
            "encoded": self.encoded,
            "memory_hits": self.memory_hits,
            "disk_hits": self.disk_hits,
            "disk_misses": self.disk.misses if self.disk is not None else 0,
            "disk_rejected": self.disk.rejected if self.disk is not None else 0,
        }
