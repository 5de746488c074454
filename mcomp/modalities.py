"""The modality table: the built-in rows (`configs/modalities.yaml`) and the rows a modality file
adds (`read_modality_file`), readable without torch.

A modality file is how a new modality joins the demo: its table row, plus a `demo` section telling
the synthetic world and the tiny zoo how to use it (see docs/adding_a_modality.md):

    name: depth
    placeholder: "<depth>"
    published_key: depth
    extension: .npy
    noun: depth map
    demo:
      adapter: {adapter: depth, ...}   # the tiny adapter config the zoo trains (a `checkpoint`
                                       # field receives the pretrained encoder's weights)
      render: {size: 16}               # settings handed to the world's renderer of the modality
      colour_target: rgb               # what encoder pretraining regresses besides the shape: rgb | pitch
      encoder_steps: 20                # zoo steps (default: the zoo's own)
      stage2_steps: 15
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from mcomp.resources import load_config, read_document


@dataclasses.dataclass(frozen=True)
class Modality:
    name: str
    placeholder: str
    published_key: str
    extension: str
    noun: str
    demo: Mapping[str, Any] | None = None  # how the demo uses an added modality (None: built in)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _read() -> dict[str, Modality]:
    table = load_config("modalities.yaml")
    return {name: Modality(name=name, **fields) for name, fields in table.items()}


MODALITIES: dict[str, Modality] = _read()  # built-in rows, then any added ones
ORDER: tuple[str, ...] = tuple(MODALITIES)  # the built-in modalities, in the published prompts' order
DEMO_KEYS = {"adapter", "render", "colour_target", "encoder_steps", "stage2_steps"}


def modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise KeyError(f"unknown modality {name!r}; known: {', '.join(MODALITIES)}")
    return MODALITIES[name]


def from_published_key(key: str) -> str:
    """The modality a released `modal_inputs` key names (vision -> image)."""
    for m in MODALITIES.values():
        if m.published_key == key:
            return m.name
    raise KeyError(
        f"unknown published modality key {key!r}; known: {', '.join(m.published_key for m in MODALITIES.values())}"
    )


def add_modality(row: Modality | Mapping[str, Any], source: str = "modality") -> Modality:
    """Add a row to the table (the same row again is a no-op); a name, placeholder or published key
    that another row has is refused."""
    m = row if isinstance(row, Modality) else _from_mapping(row, source)
    if MODALITIES.get(m.name) == m:
        return m
    if m.name in MODALITIES:
        raise ValueError(f"{source}: modality {m.name!r} is already in the table, with other fields")
    for other in MODALITIES.values():
        for field in ("placeholder", "published_key"):
            if getattr(other, field) == getattr(m, field):
                raise ValueError(f"{source}: {field} {getattr(m, field)!r} is already modality {other.name!r}'s")
    MODALITIES[m.name] = m
    return m


def read_modality_file(path: str | os.PathLike) -> Modality:
    """A modality file (YAML or JSON), checked and added to the table."""
    return add_modality(read_document(path, "modality file", dict), str(path))


def _from_mapping(data: Mapping[str, Any], source: str) -> Modality:
    fields = {f.name for f in dataclasses.fields(Modality)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; a modality has {sorted(fields)}")
    missing = sorted(f for f in fields - {"demo"} if f not in data)
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}")
    for f in fields - {"demo"}:
        if not isinstance(data[f], str) or not data[f]:
            raise ValueError(f"{source}: field {f!r} must be a non-empty string, got {data[f]!r}")
    if not data["extension"].startswith("."):
        raise ValueError(f"{source}: extension must start with '.', got {data['extension']!r}")
    demo = data.get("demo")
    if demo is not None:
        if not isinstance(demo, Mapping):
            raise ValueError(f"{source}: field 'demo' must be a mapping")
        unknown = sorted(set(demo) - DEMO_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown demo field(s) {unknown}; known: {sorted(DEMO_KEYS)}")
        if not isinstance(demo.get("adapter"), Mapping) or not demo["adapter"].get("adapter"):
            raise ValueError(f"{source}: demo.adapter must be an adapter config naming its type ('adapter: <type>')")
        if demo.get("colour_target", "rgb") not in ("rgb", "pitch"):
            raise ValueError(f"{source}: demo.colour_target must be 'rgb' or 'pitch', got {demo['colour_target']!r}")
        for key in ("encoder_steps", "stage2_steps"):
            if key in demo and (not isinstance(demo[key], int) or demo[key] < 1):
                raise ValueError(f"{source}: demo.{key} must be a positive integer, got {demo[key]!r}")
    return Modality(**{k: data[k] for k in fields if k in data})
