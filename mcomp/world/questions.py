"""Question building blocks shared by the MCUB-style sets, the modality training data and the text corpora.

Commonality questions come in two kinds:
* "entity": every input depicts the same entity; the options are four entities (the answer, one with the
  same colour, one with the same shape, one sharing nothing), so both attributes must be recognised.
* "attribute": the inputs depict different entities that share exactly one attribute value (all red,
  or all cones; the other attribute differs between every two inputs). The options are the shared value,
  two values of the other attribute that occur in only one input each, and one value of the same
  attribute that occurs in no input. One input alone cannot tell the shared value from its other
  attribute (e.g. a red cube: "red" or "cube"?); two or more inputs can.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from mcomp.modalities import MODALITIES as TABLE
from mcomp.world.entities import AttributeSpace, Entity, in_prompt_order

LETTERS = "ABCD"
# Multiple-choice questions of this world are answered with the option's text, the "cloze"
# formulation of lm-evaluation-harness (the answer files still hold the letter, the published
# schema, and scoring compares letters). Why: the zoo's 4-layer base LLM learns it within the
# build budget (91% on held-out text-only commonality questions after 1,000 steps), where it
# does not learn to map its answer to the option's letter (24% after 400 steps, 47% after 2,500).
ANSWER_SUFFIX = "Answer with the option's text."
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
KINDS = ("entity", "attribute")
# what a question about one input asks, besides its caption (modality training data, text corpora)
SAMPLE_TYPES = ("colour", "shape", "mc_entity", "mc_attribute")
OTHER = {"shape": "colour", "colour": "shape"}


def balanced_letters(n: int, rng: np.random.Generator) -> list[int]:
    """`n` answer positions, each letter used n/4 times (+-1), in seeded random order."""
    letters = [i % len(LETTERS) for i in range(n)]
    return [letters[i] for i in rng.permutation(n)]


def balanced_cycle(items: Sequence, n: int, rng: np.random.Generator) -> list:
    """`n` picks from `items`, each used n/len(items) times (+-1), in seeded random order."""
    picks = [items[i % len(items)] for i in range(n)]
    return [picks[i] for i in rng.permutation(n)]


def place(answer: str, distractors: Sequence[str], letter: int) -> list[str]:
    if len(distractors) != len(LETTERS) - 1 or answer in distractors or len(set(distractors)) != len(distractors):
        raise ValueError(f"bad options: answer {answer!r}, distractors {list(distractors)}")
    options = list(distractors)
    options.insert(letter, answer)
    return options


def format_options(options: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))


def parse_options(question: str) -> list[str]:
    """The option texts of a question written with `format_options` (in letter order)."""
    found = dict(re.findall(r"^([A-D])\. (.*)$", question, flags=re.MULTILINE))
    return [found[letter] for letter in LETTERS if letter in found]


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def entity_distractors(answer: Entity, pool: Sequence[Entity], rng: np.random.Generator) -> list[Entity]:
    """Three other entities from `pool`: same colour, same shape, neither (falling back to any other)."""
    others = [e for e in pool if e != answer]
    groups = [
        [e for e in others if e.colour == answer.colour],
        [e for e in others if e.shape == answer.shape],
        [e for e in others if e.colour != answer.colour and e.shape != answer.shape],
    ]
    chosen: list[Entity] = []
    for group in groups:
        group = [e for e in group if e not in chosen] or [e for e in others if e not in chosen]
        chosen.append(_pick(rng, group))
    return chosen


def attribute_inputs(space: AttributeSpace, kind: str, value: str, n: int, rng: np.random.Generator) -> list[Entity]:
    """`n` entities that share `value` of attribute `kind` and differ pairwise in the other attribute."""
    others = space.values(OTHER[kind])
    if n > len(others):
        raise ValueError(f"cannot make {n} inputs with distinct {OTHER[kind]}s (only {len(others)})")
    picks = [others[i] for i in rng.choice(len(others), size=n, replace=False)]
    if kind == "colour":
        return [Entity(shape=s, colour=value) for s in picks]
    return [Entity(shape=value, colour=c) for c in picks]


def attribute_distractors(
    space: AttributeSpace, kind: str, value: str, inputs: Sequence[Entity], rng: np.random.Generator
) -> list[str]:
    """Two values of the other attribute seen in one input each (one if there is a single input), and
    values of the same attribute seen in no input."""
    present = sorted({e.attribute(OTHER[kind]) for e in inputs})
    seen = [present[i] for i in rng.choice(len(present), size=min(2, len(present)), replace=False)]
    absent = [v for v in space.values(kind) if v != value]
    unseen = [absent[i] for i in rng.choice(len(absent), size=len(LETTERS) - 1 - len(seen), replace=False)]
    return seen + unseen


def modality_question(
    modality: str, entity: Entity, kind: str, option_pool: Sequence[Entity], rng: np.random.Generator
) -> tuple[str, str]:
    """(question, answer) about one input of `modality` that depicts `entity`, without the placeholder
    line: "caption" or one of `SAMPLE_TYPES`. Options name entities (or their values) from `option_pool`."""
    noun = TABLE[modality].noun
    if kind == "caption":
        describe = "Describe the image." if modality == "image" else f"What does the {noun} depict?"
        return (describe if rng.random() < 0.5 else f"What object is in the {noun}?"), entity.text
    if kind == "colour":
        return f"What colour is the object in the {noun}?", entity.colour
    if kind == "shape":
        return f"What shape is the object in the {noun}?", entity.shape
    if kind == "mc_entity":
        letter = int(rng.integers(len(LETTERS)))
        options = place(entity.text, [e.text for e in entity_distractors(entity, option_pool, rng)], letter)
        return f"What object does the {noun} depict?\n{format_options(options)}\n{ANSWER_SUFFIX}", entity.text
    if kind == "mc_attribute":
        attr = "colour" if rng.random() < 0.5 else "shape"
        value = entity.attribute(attr)
        known = sorted({e.attribute(attr) for e in option_pool} - {value})
        wrong = [known[i] for i in rng.choice(len(known), size=len(LETTERS) - 1, replace=False)]
        letter = int(rng.integers(len(LETTERS)))
        options = place(value, wrong, letter)
        return f"What {attr} is the object in the {noun}?\n{format_options(options)}\n{ANSWER_SUFFIX}", value
    raise ValueError(f"unknown question kind {kind!r} (caption or one of {', '.join(SAMPLE_TYPES)})")


@dataclasses.dataclass
class Commonality:
    """One commonality question: what the inputs depict and the lettered options."""

    kind: str  # "entity" | "attribute"
    inputs: list[Entity]
    shared: str  # the answer (an option's text): "a red cube" (entity) or "red" (attribute)
    shared_attribute: str | None  # "colour" | "shape" for the attribute kind
    options: list[str]
    letter: str

    @property
    def n(self) -> int:
        return len(self.inputs)


def entity_commonality(
    answer: Entity, n: int, pool: Sequence[Entity], letter: int, rng: np.random.Generator
) -> Commonality:
    distractors = [e.text for e in entity_distractors(answer, pool, rng)]
    return Commonality(
        "entity", [answer] * n, answer.text, None, place(answer.text, distractors, letter), LETTERS[letter]
    )


def attribute_commonality(
    space: AttributeSpace, kind: str, value: str, n: int, letter: int, rng: np.random.Generator
) -> Commonality:
    inputs = attribute_inputs(space, kind, value, n, rng)
    distractors = attribute_distractors(space, kind, value, inputs, rng)
    return Commonality("attribute", inputs, value, kind, place(value, distractors, letter), LETTERS[letter])


def commonality_question(n: int) -> str:
    if n == 2:
        return "What do both inputs have in common?"
    return f"What do all {NUMBER_WORDS.get(n, str(n))} inputs have in common?"


def placeholder_lines(modalities: Sequence[str]) -> str:
    """`image: <image>\\n...` for the present modalities, in the canonical order."""
    return "".join(f"{m}: {TABLE[m].placeholder}\n" for m in in_prompt_order(modalities))


def mcub_prompt(modalities: Sequence[str], item: Commonality) -> str:
    return (
        placeholder_lines(modalities)
        + commonality_question(item.n)
        + "\n"
        + format_options(item.options)
        + "\n"
        + ANSWER_SUFFIX
    )


def text_prompt(modalities: Sequence[str], item: Commonality) -> str:
    """The MCUB prompt with each placeholder replaced by the caption of what that input depicts."""
    ordered = in_prompt_order(modalities)
    lines = "".join(f"{m}: {e.text}\n" for m, e in zip(ordered, item.inputs))
    return lines + commonality_question(item.n) + "\n" + format_options(item.options) + "\n" + ANSWER_SUFFIX


def join_words(words: Sequence[str]) -> str:
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]
