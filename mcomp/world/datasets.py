"""What to write: the documents (JSON / text) and the media jobs (one per file to render).

Nothing here renders or writes; `generate.py` does. Paths are relative to the world folder.

* Modality training data `train/<modality>.json` (entities of the train split) and held-out-entity
  validation data `val/<modality>.json` (dev-split entities, new renders), in the `mcomp train` format:
  `{id, conversations: [{from, value}], modal_inputs: {key: [path relative to the JSON's folder]},
  media_captions: {key: [the render's caption]}}`. Per render: a caption ("Describe the image." ->
  "a red cube") and `samples_per_media - 1` of: colour question ("red"), shape question ("cube"),
  entity question with four options, colour or shape question with four options (answered with
  the option's text, see `questions.ANSWER_SUFFIX`).
  Prompts start with the MCUB placeholder line (`image: <image>\\n`). In `train`, options only name
  training entities, so held-out entities never appear as (always wrong) options.
* Encoder pretraining set `pretrain/<modality>.json`: every shape in random colours (`pretrain_plan`).
* MCUB-style sets, one data root per split (`mcub/test`, `mcub/dev`) laid out as the published task
  files expect: `data/test/MCUB-4.json`, `data/test/MCUB-3-<subset>.json`, `data/test/MCUB-answer.json`,
  media under `media/<modality>/`, plus `data/test/MCUB-meta.json` (kind, inputs, answer per id).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mcomp.benchmarks.mcub.data import answer_entry, conversation, question_entry
from mcomp.benchmarks.mcub.tasks import load_task
from mcomp.modalities import MODALITIES as TABLE
from mcomp.world.entities import AttributeSpace, Entity, EntitySplit, rng_for, world_modalities
from mcomp.world.questions import (
    SAMPLE_TYPES,
    attribute_commonality,
    balanced_cycle,
    balanced_letters,
    entity_commonality,
    mcub_prompt,
    modality_question,
    placeholder_lines,
)

# file stem -> modalities of every MCUB question file, as the shipped task files define them
MCUB_SUBSETS: dict[str, tuple[str, ...]] = {
    Path(subset.questions).stem: subset.modalities for task in ("mcub4", "mcub3") for subset in load_task(task).subsets
}
MCUB_DIR = "data/test"  # inside each MCUB data root, as the shipped task files expect


@dataclasses.dataclass(frozen=True)
class MediaJob:
    relpath: str  # relative to the world folder
    modality: str
    entity: Entity
    # a colour off the named palette, ((r, g, b), pitch in Hz), rendered instead of the entity's
    # named one: the encoder pretraining set (its entity's colour name is then not used)
    colour_value: tuple[tuple[int, int, int], float] | None = None


@dataclasses.dataclass
class Plan:
    documents: dict[str, Any] = dataclasses.field(default_factory=dict)  # relpath -> JSON object or list of text lines
    jobs: list[MediaJob] = dataclasses.field(default_factory=list)

    def merge(self, other: "Plan") -> "Plan":
        self.documents.update(other.documents)
        self.jobs.extend(other.jobs)
        return self


# --- modality training / validation data -------------------------------------------------------
def modality_samples(
    modality: str,
    entity: Entity,
    media_path: str,
    sample_id: str,
    k: int,
    option_pool: Sequence[Entity],
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """`k` conversation samples about one render: a caption first, then other question types."""
    prefix = placeholder_lines([modality])
    kinds = ["caption"] + [SAMPLE_TYPES[i] for i in rng.permutation(len(SAMPLE_TYPES))[: max(0, k - 1)]]
    out = []
    for j, kind in enumerate(kinds):
        question, answer = modality_question(modality, entity, kind, option_pool, rng)
        out.append(
            {
                "id": f"{sample_id}-{j}",
                "conversations": conversation(prefix + question, answer),
                "modal_inputs": {TABLE[modality].published_key: [media_path]},
                "media_captions": {TABLE[modality].published_key: [entity.text]},
            }
        )
    return out


def modality_plan(
    folder: str,
    entities: Sequence[Entity],
    n_media: int,
    samples_per_media: int,
    option_pool: Sequence[Entity],
    seed: int,
    modalities: Sequence[str],
) -> Plan:
    """`<folder>/<modality>.json` for each of `modalities`, over `n_media` renders of `entities` (balanced)."""
    plan = Plan()
    for modality in modalities:
        rng = rng_for(seed, folder, modality, "questions")
        picks = balanced_cycle(list(entities), n_media, rng)
        samples = []
        for i, entity in enumerate(picks):
            local = f"media/{modality}/{i:05d}{TABLE[modality].extension}"
            plan.jobs.append(MediaJob(f"{folder}/{local}", modality, entity))
            samples += modality_samples(
                modality, entity, local, f"{folder}-{modality}-{i:05d}", samples_per_media, option_pool, rng
            )
        plan.documents[f"{folder}/{modality}.json"] = samples
    return plan


# --- MCUB-style sets ------------------------------------------------------------------------------
def mcub_plan(
    space: AttributeSpace,
    split_name: str,
    answers_pool: Sequence[Entity],
    n_questions: int,
    attribute_fraction: float,
    seed: int,
) -> Plan:
    """Question files, answer file and metadata of one MCUB data root (`mcub/<split_name>`).

    Entity questions: the answer (shared entity) cycles over `answers_pool` (the split's held-out
    entities); distractor options may be any other entity. Attribute questions: the shared value cycles
    over all colours and shapes; the inputs may be any entities (new renders).
    """
    root = f"mcub/{split_name}"
    everything = space.entities()
    plan = Plan()
    answers, meta = [], []
    for subset, modalities in MCUB_SUBSETS.items():
        rng = rng_for(seed, root, subset)
        n_attr = int(round(n_questions * attribute_fraction))
        kinds = ["attribute"] * n_attr + ["entity"] * (n_questions - n_attr)
        kinds = [kinds[i] for i in rng.permutation(n_questions)]
        letters = balanced_letters(n_questions, rng)
        entity_answers = iter(balanced_cycle(list(answers_pool), n_questions - n_attr, rng))
        shared_values = [("colour", v) for v in space.colour_names] + [("shape", v) for v in space.shape_names]
        attribute_answers = iter(balanced_cycle(shared_values, n_attr, rng))
        questions = []
        for i, kind in enumerate(kinds):
            qid = f"{split_name}-{subset}-{i:04d}"
            n = len(modalities)
            if kind == "entity":
                item = entity_commonality(next(entity_answers), n, everything, letters[i], rng)
            else:
                attr, value = next(attribute_answers)
                item = attribute_commonality(space, attr, value, n, letters[i], rng)
            modal_inputs: dict[str, list[str]] = {}
            for modality, entity in zip(modalities, item.inputs):
                local = f"media/{modality}/{qid}{TABLE[modality].extension}"
                plan.jobs.append(MediaJob(f"{root}/{local}", modality, entity))
                modal_inputs[TABLE[modality].published_key] = [local]
            prompt = mcub_prompt(modalities, item)
            questions.append(question_entry(qid, prompt, modal_inputs))
            answers.append(answer_entry(qid, prompt, item.letter))
            meta.append(
                {
                    "id": qid,
                    "subset": subset,
                    "kind": item.kind,
                    "answer": item.letter,
                    "answer_text": item.shared,
                    "shared_attribute": item.shared_attribute,
                    "options": item.options,
                    "inputs": {m: e.key for m, e in zip(modalities, item.inputs)},
                }
            )
        plan.documents[f"{root}/{MCUB_DIR}/{subset}.json"] = questions
    plan.documents[f"{root}/{MCUB_DIR}/MCUB-answer.json"] = answers
    plan.documents[f"{root}/{MCUB_DIR}/MCUB-meta.json"] = meta
    return plan


# --- encoder pretraining set ------------------------------------------------------------------------
PRETRAIN_COLOUR = "any"  # the colour name of pretraining jobs (their colour is `MediaJob.colour_value`)


def pretrain_plan(space: AttributeSpace, n_media: int, seed: int, modalities: Sequence[str]) -> Plan:
    """`pretrain/<modality>.json`: `n_media` renders per modality of every shape (balanced) in random
    colours, uniform over RGB and log-uniform in pitch over the palette's range and a little beyond,
    each listed as {file (relative to the JSON's folder), shape, rgb, pitch_hz}.

    Why: the tiny encoders are pretrained on these, not on the named-colour training renders. In the
    training split a colour comes with only some shapes, and an encoder trained there uses colour as
    a shape cue, failing on held-out colour-shape combinations (0-8% of their shapes in every
    modality); here shape and colour are independent, as for a real encoder's pretraining data."""
    plan = Plan()
    pitches = [c.pitch_hz for c in space.colours]
    lo, hi = np.log(min(pitches) / 1.2), np.log(max(pitches) * 1.2)
    for modality in modalities:
        rng = rng_for(seed, "pretrain", modality)
        shapes = balanced_cycle(space.shape_names, n_media, rng)
        items = []
        for i, shape in enumerate(shapes):
            local = f"media/{modality}/{i:05d}{TABLE[modality].extension}"
            rgb = tuple(int(v) for v in rng.integers(0, 256, size=3))
            pitch = float(np.exp(rng.uniform(lo, hi)))
            plan.jobs.append(MediaJob(f"pretrain/{local}", modality, Entity(shape, PRETRAIN_COLOUR), (rgb, pitch)))
            items.append({"file": local, "shape": shape, "rgb": list(rgb), "pitch_hz": round(pitch, 3)})
        plan.documents[f"pretrain/{modality}.json"] = items
    return plan


def world_plan(space: AttributeSpace, split: EntitySplit, cfg: Mapping[str, Any], seed: int) -> Plan:
    """Every document and media job of the world, except the text corpora and the manifest."""
    modalities = world_modalities(cfg)
    plan = pretrain_plan(space, int(cfg["pretrain"]["media_per_modality"]), seed, modalities)
    plan.merge(
        modality_plan(
            "train",
            split.train,
            cfg["train"]["media_per_modality"],
            cfg["train"]["samples_per_media"],
            split.train,
            seed,
            modalities,
        )
    )
    plan.merge(
        modality_plan(
            "val",
            split.dev,
            cfg["val"]["media_per_modality"],
            cfg["val"]["samples_per_media"],
            space.entities(),
            seed,
            modalities,
        )
    )
    for split_name, key in (("test", "test_questions"), ("dev", "dev_questions")):
        plan.merge(
            mcub_plan(
                space,
                split_name,
                split.of(split_name),
                cfg["mcub"][key],
                cfg["mcub"]["attribute_fraction"],
                seed,
            )
        )
    return plan
