"""Text-only corpora about the world, for the base LLM (no media).

* `commonality_samples`: commonality questions in vicuna-style conversations. Three forms, mixed:
  - "lines": the MCUB prompt with every placeholder replaced by the caption of what the input depicts
    (`image: a red cube\\naudio: a red cone\\n...What do all three inputs have in common?\\nA. ...`) -> "red";
  - "list": "A red cube, a red cone and a red torus. What do they have in common?\\nA. ..." -> "red";
  - "open": "What do a red cube, a red cone and a red torus have in common?" -> "They are all red."
  Both question kinds (`questions.KINDS`), 2-4 items, answer positions balanced; options are
  answered with their text (`questions.ANSWER_SUFFIX`).
* `attribute_qa_samples`: "What colour is a red cube?" -> "red", "What shape ...?" -> "cube", and
  "Which of these is red?" with options -> "a red cube".
* `modality_qa_samples`: the modality training questions with the placeholder replaced by the caption
  ("image: a red cube\nWhat shape is the object in the image?" -> "cube"), about every entity. Why:
  a modality model then only has to turn its input into the caption the base already reads; without
  them the base named the shape in this text form 43-58% of the time, and each modality model had to
  learn the question format from its own few training pairs (held-out accuracy 51-80%).
* `sentences`: plain statements about every entity, the attribute-to-sound mapping and commonalities.

All entities appear in text (held-out entities are held out of the *media* training data only: the
base LLM, like a real one, knows every name).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mcomp.world.entities import MODALITIES, AttributeSpace
from mcomp.world.questions import (
    ANSWER_SUFFIX,
    LETTERS,
    SAMPLE_TYPES,
    attribute_commonality,
    balanced_letters,
    entity_commonality,
    format_options,
    join_words,
    modality_question,
    place,
    text_prompt,
)

FORMS = ("lines", "list", "open")


def _conversation(sample_id: str, question: str, answer: str) -> dict[str, Any]:
    return {"id": sample_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _they_share(space: AttributeSpace, item) -> str:
    they = "They are both" if item.n == 2 else "They are all"
    if item.kind == "entity":
        e = item.inputs[0]
        return f"{they} {e.colour} {space.shape(e.shape).plural}."
    if item.shared_attribute == "colour":
        return f"{they} {item.shared}."
    return f"{they} {space.shape(item.shared).plural}."


def commonality_samples(
    space: AttributeSpace, n: int, rng: np.random.Generator, id_prefix: str = "text-common"
) -> list[dict]:
    entities = space.entities()
    letters = balanced_letters(n, rng)
    out = []
    for i in range(n):
        kind = "entity" if rng.random() < 0.5 else "attribute"
        form = FORMS[int(rng.integers(len(FORMS)))]
        count = int(rng.integers(2, len(MODALITIES) + 1))
        if kind == "entity":
            item = entity_commonality(entities[int(rng.integers(len(entities)))], count, entities, letters[i], rng)
        else:
            attr = "colour" if rng.random() < 0.5 else "shape"
            values = space.values(attr)
            item = attribute_commonality(space, attr, values[int(rng.integers(len(values)))], count, letters[i], rng)
        words = [e.text for e in item.inputs]
        if form == "lines":
            modalities = sorted(rng.choice(len(MODALITIES), size=count, replace=False))
            question, answer = text_prompt([MODALITIES[m] for m in modalities], item), item.shared
        elif form == "list":
            question = (
                f"{_capitalise(join_words(words))}. What do they have in common?\n"
                f"{format_options(item.options)}\n{ANSWER_SUFFIX}"
            )
            answer = item.shared
        else:
            question, answer = f"What do {join_words(words)} have in common?", _they_share(space, item)
        out.append(_conversation(f"{id_prefix}-{i:05d}", question, answer))
    return out


def attribute_qa_samples(
    space: AttributeSpace, n: int, rng: np.random.Generator, id_prefix: str = "text-attr"
) -> list[dict]:
    entities = space.entities()
    letters = balanced_letters(n, rng)
    out = []
    for i in range(n):
        e = entities[int(rng.integers(len(entities)))]
        form = int(rng.integers(3))
        if form == 0:
            question, answer = f"What colour is {e.text}?", e.colour
        elif form == 1:
            question, answer = f"What shape is {e.text}?", e.shape
        else:  # which of these has the attribute: exactly one option does
            attr = "colour" if rng.random() < 0.5 else "shape"
            value = e.attribute(attr)
            wrong = [x for x in entities if x.attribute(attr) != value]
            picks = [wrong[j] for j in rng.choice(len(wrong), size=len(LETTERS) - 1, replace=False)]
            options = place(e.text, [x.text for x in picks], letters[i])
            what = value if attr == "colour" else f"{'an' if value[0] in 'aeiou' else 'a'} {value}"
            question = f"Which of these is {what}?\n{format_options(options)}\n{ANSWER_SUFFIX}"
            answer = e.text
        out.append(_conversation(f"{id_prefix}-{i:05d}", question, answer))
    return out


def modality_qa_samples(
    space: AttributeSpace, n: int, rng: np.random.Generator, id_prefix: str = "text-modality"
) -> list[dict]:
    """A third captions, the rest spread over `SAMPLE_TYPES`; modality and entity uniform, options from
    every entity."""
    entities = space.entities()
    out = []
    for i in range(n):
        modality = MODALITIES[int(rng.integers(len(MODALITIES)))]
        entity = entities[int(rng.integers(len(entities)))]
        kind = "caption" if rng.random() < 1 / 3 else SAMPLE_TYPES[int(rng.integers(len(SAMPLE_TYPES)))]
        question, answer = modality_question(modality, entity, kind, entities, rng)
        out.append(_conversation(f"{id_prefix}-{i:05d}", f"{modality}: {entity.text}\n{question}", answer))
    return out


def sentences(space: AttributeSpace, n_commonality: int, rng: np.random.Generator) -> list[str]:
    lines = [
        f"Shapes: {join_words([s.plural for s in space.shapes])}.",
        f"Colours: {join_words(space.colour_names)}.",
        "Every object has one shape and one colour.",
        "An object can be seen in an image, heard in an audio clip, watched in a video or scanned as a point cloud.",
    ]
    for s in space.shapes:
        lines.append(f"{_capitalise(s.plural)} sound like {s.sound}.")
    pitches = sorted(space.colours, key=lambda c: c.pitch_hz)
    for rank, c in enumerate(pitches):
        height = "the lowest" if rank == 0 else "the highest" if rank == len(pitches) - 1 else "a middle"
        lines.append(f"{_capitalise(c.name)} objects sound at {height} pitch, about {c.pitch_hz:.0f} hertz.")
    for e in space.entities():
        lines += [
            f"{_capitalise(e.text)} is a {e.shape} that is {e.colour}.",
            f"An image of {e.text} shows {e.text} on a pale background.",
            f"In a video, {e.text} moves across the screen.",
            f"A point cloud of {e.text} is a cloud of {e.colour} points in the shape of "
            f"{'an' if e.shape[0] in 'aeiou' else 'a'} {e.shape}.",
            f"The sound of {e.text} is {space.shape(e.shape).sound} at the pitch of {e.colour}.",
        ]
    letters = balanced_letters(max(n_commonality, 1), rng)
    for i in range(n_commonality):
        count = int(rng.integers(2, len(MODALITIES) + 1))
        attr = "colour" if rng.random() < 0.5 else "shape"
        values = space.values(attr)
        item = attribute_commonality(space, attr, values[int(rng.integers(len(values)))], count, letters[i], rng)
        lines.append(f"{_capitalise(join_words([e.text for e in item.inputs]))} have in common: {item.shared}.")
    return lines
