"""The attribute space of the synthetic world, its entities, the seeded train/dev/test split and
the per-file seeding scheme."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import zlib
from typing import Any, Iterable, Mapping

import numpy as np

from mcomp.modalities import ORDER, add_modality
from mcomp.resources import load_config

MODALITIES = ORDER  # the built-in modalities, in the placeholder order of the prompts


def in_prompt_order(modalities: Iterable[str]) -> list[str]:
    """The built-in modalities in their published order, then any added ones as given."""
    given = list(modalities)
    return [m for m in MODALITIES if m in given] + [m for m in given if m not in MODALITIES]


def world_modalities(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The modalities a world config renders and writes training data for (default: the built-in
    ones; others come from modality files, their table rows kept in `added_modalities`)."""
    for row in (cfg.get("added_modalities") or {}).values():
        add_modality(row, "world config added_modalities")
    return tuple(cfg.get("modalities") or ORDER)


SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    plural: str
    timbre: str  # audio waveform family (render_audio.TIMBRES)
    sound: str  # how the timbre is described in text


@dataclasses.dataclass(frozen=True)
class Colour:
    name: str
    rgb: tuple[int, int, int]
    pitch_hz: float


@dataclasses.dataclass(frozen=True, order=True)
class Entity:
    """One shape in one colour, e.g. the red cube."""

    shape: str
    colour: str

    @property
    def name(self) -> str:  # "red cube"
        return f"{self.colour} {self.shape}"

    @property
    def text(self) -> str:  # "a red cube" (the caption and option text)
        return f"{_article(self.colour)} {self.colour} {self.shape}"

    @property
    def key(self) -> str:  # "red_cube" (for files and metadata)
        return f"{self.colour}_{self.shape}"

    def attribute(self, kind: str) -> str:
        if kind not in ("shape", "colour"):
            raise ValueError(f"unknown attribute {kind!r} (expected 'shape' or 'colour')")
        return self.shape if kind == "shape" else self.colour

    @classmethod
    def from_key(cls, key: str) -> "Entity":
        colour, shape = key.split("_", 1)
        return cls(shape=shape, colour=colour)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class AttributeSpace:
    shapes: tuple[Shape, ...]
    colours: tuple[Colour, ...]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "AttributeSpace":
        shapes = tuple(
            Shape(s["name"], s.get("plural", s["name"] + "s"), s["timbre"], s.get("sound", s["timbre"]))
            for s in cfg["shapes"]
        )
        colours = tuple(
            Colour(c["name"], tuple(int(v) for v in c["rgb"]), float(c["pitch_hz"])) for c in cfg["colours"]
        )
        for kind, items in (("shape", shapes), ("colour", colours)):
            names = [i.name for i in items]
            if len(set(names)) != len(names):
                raise ValueError(f"world attributes: duplicate {kind} names in {names}")
            if len(names) < 4:
                raise ValueError(f"world attributes: need at least 4 {kind}s for 4-option questions, got {names}")
            bad = [n for n in names if not n.isalpha() or not n.islower()]
            if bad:
                raise ValueError(f"world attributes: {kind} names must be lowercase words, got {bad}")
        return cls(shapes, colours)

    @property
    def shape_names(self) -> list[str]:
        return [s.name for s in self.shapes]

    @property
    def colour_names(self) -> list[str]:
        return [c.name for c in self.colours]

    def shape(self, name: str) -> Shape:
        return next(s for s in self.shapes if s.name == name)

    def colour(self, name: str) -> Colour:
        return next(c for c in self.colours if c.name == name)

    def values(self, kind: str) -> list[str]:
        return self.shape_names if kind == "shape" else self.colour_names

    def entities(self) -> list[Entity]:
        return [Entity(s, c) for c, s in itertools.product(self.colour_names, self.shape_names)]


def load_attribute_space(name: str = "attributes.yaml") -> AttributeSpace:
    return AttributeSpace.from_config(load_config("world", name))


# --- the split -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EntitySplit:
    train: tuple[Entity, ...]
    dev: tuple[Entity, ...]
    test: tuple[Entity, ...]

    def of(self, split: str) -> tuple[Entity, ...]:
        return getattr(self, split)

    def to_json(self) -> dict[str, list[str]]:
        return {s: [e.key for e in self.of(s)] for s in SPLITS}


def split_entities(space: AttributeSpace, n_dev: int, n_test: int, seed: int, max_tries: int = 10000) -> EntitySplit:
    """Hold out `n_dev` and `n_test` entities (attribute combinations) from training, seeded.

    Constraints: the three sets are disjoint; training still contains every shape and every colour
    (so held-out entities are new combinations of known attributes); within a held-out set colours are
    distinct while there are enough colours, and every shape appears when the set is large enough.
    """
    everything = space.entities()
    n_col, n_shape = len(space.colours), len(space.shapes)
    if n_dev + n_test >= len(everything):
        raise ValueError(f"cannot hold out {n_dev}+{n_test} of {len(everything)} entities")
    rng = rng_for(seed, "entity-split")

    def heldout(k: int) -> list[Entity]:
        # distinct colours (while there are enough), every shape once before any repeats
        colours = [space.colour_names[i % n_col] for i in rng.permutation(max(k, n_col))[:k]]
        shapes = [space.shape_names[i] for _ in range(-(-k // n_shape)) for i in rng.permutation(n_shape)][:k]
        return [Entity(shape=s, colour=c) for s, c in zip(shapes, colours)]

    for _ in range(max_tries):
        test = heldout(n_test)
        dev = heldout(n_dev)
        if len(set(test) | set(dev)) != n_test + n_dev:
            continue
        train = [e for e in everything if e not in test and e not in dev]
        if {e.shape for e in train} != set(space.shape_names) or {e.colour for e in train} != set(space.colour_names):
            continue
        return EntitySplit(tuple(sorted(train)), tuple(sorted(dev)), tuple(sorted(test)))
    raise ValueError(f"no entity split with {n_dev} dev and {n_test} test entities satisfies the constraints")


# --- seeding -------------------------------------------------------------------------------------
def stream_id(name: str) -> int:
    """A stable 32-bit id for a named random stream (independent of Python's hash seed)."""
    return zlib.crc32(name.encode("utf-8"))


def rng_for(seed: int, *names: str | int) -> np.random.Generator:
    """The generator of one named stream, e.g. rng_for(seed, "train", "image", 17). Every file has its
    own stream, so results do not depend on generation order (or on parallel workers)."""
    words = [int(seed)] + [n if isinstance(n, int) else stream_id(n) for n in names]
    return np.random.default_rng(words)


def digest(obj: Any) -> str:
    """sha256 of a JSON-serialisable object (canonical form)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def entity_list(keys: Iterable[str]) -> list[Entity]:
    return [Entity.from_key(k) for k in keys]
