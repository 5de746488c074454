"""Configs are dataclasses that round-trip to JSON (the peft way)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypeVar

from mcomp.io import atomic_write_text

T = TypeVar("T", bound="JsonConfig")


@dataclasses.dataclass
class JsonConfig:
    """Mixin: `to_dict`/`from_dict` and JSON files. Unknown fields are an error, not ignored."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json_file(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls: type[T], path: str | os.PathLike) -> T:
        from mcomp.resources import read_document

        return cls.from_dict(read_document(path, f"{cls.__name__} file", dict), source=str(path))


def parse_pairs(text: str | None, what: str, convert=str) -> dict:
    """NAME=VALUE,... -> {NAME: convert(VALUE)}; a name given twice is an error, not a silent overwrite."""
    out = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{what}: expected NAME=VALUE pairs separated by commas, got {item!r}")
        if key.strip() in out:
            raise ValueError(f"{what}: {key.strip()!r} is given twice")
        try:
            out[key.strip()] = convert(value.strip())
        except ValueError:
            raise ValueError(f"{what}: bad value in {item!r}") from None
    return out
