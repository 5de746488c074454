"""Prompt construction for evaluation (spec section 4), as the published evaluation builds it.

The question file's whole conversation list is rendered by the task's template (published:
`vicuna_v1`), as the published preprocess does: a first turn that is not the human's is dropped,
every turn is rendered, and a gpt turn without a value ends the text as "ASSISTANT:" (the usual
`[human, gpt: null]` file gives "<system> USER: <question> ASSISTANT:"). The placeholders stay at
their textual positions, where the model splices the features.

A question with media but no placeholder in any turn: the published model has nowhere to put the
media and answers from the text alone, and so does mcomp by default (`media_without_placeholder:
ignore`, with a warning). `prefix` (a task's prompt option) puts one "name: <tag>" line per input
before the first human turn, in the task's modality order (the published demo's convention).
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

from mcomp.conversation import ConversationTemplate

logger = logging.getLogger(__name__)

MEDIA_WITHOUT_PLACEHOLDER = ("ignore", "prefix")


class Prompt(NamedTuple):
    text: str
    media: dict[str, list[str]]  # what the model is given with the text
    media_ignored: bool = False  # the sample has media that `text` has no placeholder for


def has_placeholder(model, sample) -> bool:
    tags = [model.adapters[m].placeholder for m in model.modalities]
    return any(tag in (value or "") for _, value in sample.turns for tag in tags)


def placeholder_lines(model, sample, modality_order: Sequence[str]) -> list[str]:
    """One "name: <tag>" line per media file of the sample, in the task's modality order."""
    per_modality: dict[str, int] = {}
    for key, paths in sample.media.items():
        modality = model.modality_of(key)
        per_modality[modality] = per_modality.get(modality, 0) + len(paths)
    order = list(modality_order) + sorted(m for m in per_modality if m not in modality_order)
    return [f"{m}: {model.adapters[m].placeholder}" for m in order for _ in range(per_modality.get(m, 0))]


def ordered_media(model, sample, modality_order: Sequence[str]) -> dict[str, list[str]]:
    """The sample's media keyed as in the file, in the task's modality order (then any others)."""
    rank = {m: i for i, m in enumerate(modality_order)}
    keys = sorted(sample.media, key=lambda k: (rank.get(model.modality_of(k), len(rank)), k))
    return {k: list(sample.media[k]) for k in keys}


def build_prompt(
    model,
    template: ConversationTemplate,
    sample,
    modality_order: Sequence[str],
    media_without_placeholder: str = "ignore",
) -> Prompt:
    turns = list(sample.turns)
    media = ordered_media(model, sample, modality_order)
    if media and not has_placeholder(model, sample):
        if media_without_placeholder == "prefix":
            first = next(k for k, (role, _) in enumerate(turns) if role == "human")
            turns[first] = ("human", "\n".join(placeholder_lines(model, sample, modality_order) + [turns[first][1]]))
        elif media_without_placeholder == "ignore":
            logger.debug("sample %r has media but no placeholder: answered from its text alone", sample.id)
            return Prompt(template.render(turns), {}, media_ignored=True)
        else:
            raise ValueError(
                f"media_without_placeholder must be one of {MEDIA_WITHOUT_PLACEHOLDER}, "
                f"got {media_without_placeholder!r}"
            )
    return Prompt(template.render(turns), media)
