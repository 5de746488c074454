"""Tokenise prompts that contain modality placeholders, as the published models do.

The prompt is split at each placeholder tag; every text chunk is tokenised on its own (so text
after a placeholder gets the tokenizer's start-of-text handling again), the BOS token is kept only
once at the start, and each placeholder becomes a negative sentinel id that the model later
replaces by that modality's features. The vocabulary is not changed.
"""
from __future__ import annotations

import re
from typing import Mapping


def placeholder_pattern(tags: Mapping[str, int]) -> re.Pattern:
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True)) + ")")


def tokenize_with_placeholders(tokenizer, text: str, tags: Mapping[str, int]) -> list[int]:
    """[BOS] + ids of each chunk (without its BOS) + sentinel id of each placeholder."""
    bos = tokenizer.bos_token_id
    ids: list[int] = [] if bos is None else [bos]
    parts = placeholder_pattern(tags).split(text) if tags else [text]
    for i, part in enumerate(parts):
        if i % 2 == 1:  # a captured placeholder tag
            ids.append(tags[part])
            continue
        if not part:
            continue
        chunk = tokenizer(part, add_special_tokens=True)["input_ids"]
        if bos is not None and chunk and chunk[0] == bos:
            chunk = chunk[1:]
        ids.extend(chunk)
    return ids


def tokenize_continuation(tokenizer, text: str) -> list[int]:
    """A continuation (answer, option) tokenised alone, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
