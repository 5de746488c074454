"""Run identity: a fingerprint of everything that determines a piece of work, and what changed.

Whatever resumes or reuses earlier work (a training checkpoint, an evaluation run, a cached
feature, a zoo step) records the identity it was made with and compares it with the identity of
the work asked for now; a difference is refused with the fields that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from mcomp.io import sha256_file


class IdentityMismatch(ValueError):
    """Earlier work found where new work was asked for is not the same work."""


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def tensors_sha256(tensors: Mapping[str, "torch.Tensor"]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def directory_digest(path: str | os.PathLike) -> str:
    """sha256 over every file's relative path and content under `path` (hidden entries skipped); the
    files are hashed on two threads (hashlib releases the GIL, so the shards of a checkpoint hash side by side)."""
    from concurrent.futures import ThreadPoolExecutor

    root = Path(path)
    files = [
        file
        for file in sorted(p for p in root.rglob("*") if p.is_file())
        if not any(part.startswith(".") for part in file.relative_to(root).parts)
    ]
    with ThreadPoolExecutor(2) as pool:
        digests = list(pool.map(sha256_file, files))
    h = hashlib.sha256()
    for file, digest in zip(files, digests):
        h.update(f"{file.relative_to(root).as_posix()}\0{digest}\n".encode())
    return h.hexdigest()


def code_versions() -> dict[str, str]:
    """Versions of the code that computes results (mcomp and the numerical libraries under it)."""
    import importlib.metadata as md

    out = {}
    for dist in ("mcomp", "torch", "transformers", "peft"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def _short(value: Any) -> str:
    text = canonical_json(value)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """'field: X there, Y now' for every leaf field that differs (dotted paths)."""
    old, new = _flatten(dict(recorded)), _flatten(dict(wanted))
    return [
        f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def check_same_work(where: str, recorded: Mapping[str, Any], wanted: Mapping[str, Any], hint: str) -> None:
    """Raise IdentityMismatch naming what changed, unless the two identities are equal."""
    changed = differences(recorded, wanted)
    if changed:
        raise IdentityMismatch(
            f"{where} holds different work ({'; '.join(changed[:8])}{'; ...' if len(changed) > 8 else ''}); {hint}"
        )
