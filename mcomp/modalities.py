"""The built-in modality table (`configs/modalities.yaml`), readable without torch."""

from __future__ import annotations

import dataclasses

from mcomp.resources import load_config


@dataclasses.dataclass(frozen=True)
class Modality:
    name: str
    placeholder: str
    published_key: str
    extension: str
    noun: str


def _read() -> dict[str, Modality]:
    table = load_config("modalities.yaml")
    return {name: Modality(name=name, **fields) for name, fields in table.items()}


MODALITIES: dict[str, Modality] = _read()
ORDER: tuple[str, ...] = tuple(MODALITIES)  # the published prompts' order


def modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise KeyError(f"unknown modality {name!r}; built-in: {', '.join(ORDER)}")
    return MODALITIES[name]


def from_published_key(key: str) -> str:
    """The modality a released `modal_inputs` key names (vision -> image)."""
    for m in MODALITIES.values():
        if m.published_key == key:
            return m.name
    raise KeyError(
        f"unknown published modality key {key!r}; known: {', '.join(m.published_key for m in MODALITIES.values())}"
    )
