"""Prompt construction for evaluation (spec section 4).

The first human turn of the question file is used verbatim: it already holds the placeholders,
which the model replaces by features at their textual positions. It is wrapped in the task's
conversation template (published: `vicuna_v1`, giving "<system> USER: <question> ASSISTANT:").
Only when a question has media but no placeholder at all (e.g. a hand-written file) is one
"name: <tag>" line per input put before it, in the task's modality order (the published demo's
convention), so the media are not silently ignored.
"""
from __future__ import annotations

import logging
from typing import Sequence

from mcomp.conversation import ConversationTemplate

logger = logging.getLogger(__name__)


def question_text(model, sample, modality_order: Sequence[str]) -> str:
    tags = {m: model.adapters[m].placeholder for m in model.modalities}
    if not sample.media or any(tag in sample.question for tag in tags.values()):
        return sample.question
    per_modality: dict[str, int] = {}
    for key, paths in sample.media.items():
        modality = model.modality_of(key)
        per_modality[modality] = per_modality.get(modality, 0) + len(paths)
    order = list(modality_order) + sorted(m for m in per_modality if m not in modality_order)
    lines = [f"{m}: {tags[m]}" for m in order for _ in range(per_modality.get(m, 0))]
    logger.debug("sample %r has no placeholders; prefixing %s", sample.id, lines)
    return "\n".join(lines + [sample.question])


def ordered_media(model, sample, modality_order: Sequence[str]) -> dict[str, list[str]]:
    """The sample's media keyed as in the file, in the task's modality order (then any others)."""
    rank = {m: i for i, m in enumerate(modality_order)}
    keys = sorted(sample.media, key=lambda k: (rank.get(model.modality_of(k), len(rank)), k))
    return {k: list(sample.media[k]) for k in keys}


def build_prompt(model, template: ConversationTemplate, sample, modality_order: Sequence[str]) -> str:
    return template.prompt(question_text(model, sample, modality_order))
