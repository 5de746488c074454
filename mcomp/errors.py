"""Errors that name the file, tensor or field at fault."""

from __future__ import annotations

import os


class MediaError(ValueError):
    """A media file could not be decoded or does not meet an adapter's expectations."""

    def __init__(self, path: str | os.PathLike | None, reason: str, modality: str | None = None):
        self.path = None if path is None else str(path)
        self.reason = reason
        self.modality = modality
        what = f"{modality} input" if modality else "media input"
        where = f" '{self.path}'" if self.path is not None else ""
        super().__init__(f"cannot use {what}{where}: {reason}")


class MediaBatchError(ValueError):
    """Some samples of a batch failed; `failures` maps sample index -> MediaError. The others are fine."""

    def __init__(self, failures: dict[int, MediaError]):
        self.failures = dict(sorted(failures.items()))
        lines = [f"  sample {i}: {err}" for i, err in self.failures.items()]
        super().__init__(f"{len(self.failures)} sample(s) in the batch have unusable media:\n" + "\n".join(lines))


class SampleError(ValueError):
    """One sample of a batch is unusable; `sample` is its index in the batch (None: not one sample's
    fault) and `reason` what is wrong with it, so callers can name the sample their own way."""

    def __init__(self, reason: str, sample: int | None = None):
        self.sample = sample
        self.reason = reason
        super().__init__(reason if sample is None else f"sample {sample}: {reason}")


class PlaceholderMismatchError(SampleError):
    """The placeholders in a prompt and the media given for it disagree."""
