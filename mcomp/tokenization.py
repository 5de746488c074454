"""Tokenise prompts that contain modality placeholders, as the published models do.

The prompt is split at each placeholder tag; every text chunk is tokenised on its own (so text
after a placeholder gets the tokenizer's start-of-text handling again), the BOS token is kept only
once at the start, and each placeholder becomes a negative sentinel id that the model later
replaces by that modality's features. The vocabulary is not changed.

A chunk's ids are the ones the published code's tokenizer gives: for a LLaMA
SentencePiece tokenizer (Vicuna's `tokenizer.model`), the slow `LlamaTokenizer` of transformers
4.31 that the released code loads (`use_fast=False`), rebuilt on the `sentencepiece` library
(`slow_llama_encoder`); transformers 5's LlamaTokenizer differs from it on text that starts with a
space and, with `legacy: false`, on text after `</s>`. Any other tokenizer is called as it is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Mapping

logger = logging.getLogger(__name__)

SPACE = "\u2581"  # SentencePiece's escaped space
LLAMA_TOKENIZERS = ("LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")


class SlowLlamaEncoder:
    """`LlamaTokenizer(text)["input_ids"]` of transformers 4.31 (the slow, SentencePiece tokenizer).

    Its `tokenize`: the text is split at every added token (the special tokens among them), with the
    whitespace next to one stripped on the sides its lstrip/rstrip flags say; each text piece is
    encoded by SentencePiece with its dummy prefix (`legacy`, 4.31's default), or, with
    `legacy=False`, the text is first given one "▁" that only the first piece keeps, and a later
    piece that does not start with a space loses the "▁" its first token starts with; BOS in front
    when `add_bos_token`."""

    def __init__(
        self,
        model_file: str | os.PathLike,
        added: Mapping[str, tuple[int, bool, bool]],
        bos_id: int | None,
        add_bos: bool = True,
        legacy: bool = True,
    ):
        import sentencepiece

        self.model_file = str(model_file)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        self.added = dict(added)  # content -> (id, lstrip, rstrip)
        self.bos_id = bos_id if add_bos else None
        self.legacy = legacy
        self.split = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")")
            if self.added
            else None
        )

    def __call__(self, text: str) -> list[int]:
        if not self.legacy:
            text = SPACE + text.replace(SPACE, " ")
        parts = self.split.split(text) if self.split is not None else [text]
        for k in range(1, len(parts), 2):  # the added tokens' strip flags trim their neighbours
            _, lstrip, rstrip = self.added[parts[k]]
            if lstrip:
                parts[k - 1] = parts[k - 1].rstrip()
            if rstrip:
                parts[k + 1] = parts[k + 1].lstrip()
        ids = [] if self.bos_id is None else [self.bos_id]
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.added[part][0])
            elif part:
                ids.extend(self._piece(part, first=k == 0))
        return ids

    def _piece(self, text: str, first: bool) -> list[int]:
        if self.legacy:
            return self.sp.encode(text)
        if first:  # the "▁" given to the whole text stands for SentencePiece's own dummy prefix
            return self.sp.encode(text[1:])
        pieces = self.sp.encode(text, out_type=str)
        if not text.startswith(" ") and pieces and pieces[0].startswith(SPACE):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return [self.sp.piece_to_id(p) for p in pieces]


def sentencepiece_file(tokenizer) -> Path | None:
    """The SentencePiece model a LLaMA tokenizer was loaded from, if it is there."""
    if type(tokenizer).__name__ not in LLAMA_TOKENIZERS:
        return None
    path = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
    return Path(path) if path and Path(path).is_file() else None


def released_legacy(tokenizer) -> bool:
    """The tokenizer's `legacy` setting; unset, transformers 4.31's default (True)."""
    legacy = getattr(tokenizer, "legacy", tokenizer.init_kwargs.get("legacy"))
    return True if legacy is None else bool(legacy)


def slow_llama_encoder(tokenizer) -> SlowLlamaEncoder | None:
    """The published code's tokenizer for a LLaMA tokenizer loaded with its SentencePiece model;
    None for any other (which is then called as it is)."""
    model_file = sentencepiece_file(tokenizer)
    if model_file is None:
        if type(tokenizer).__name__ in LLAMA_TOKENIZERS:
            logger.warning(
                "a LLaMA tokenizer without its tokenizer.model: transformers' own ids are used, which "
                "differ from the released code's on text that starts with a space (and, with legacy "
                "false, after </s>)"
            )
        return None
    added = {t.content: (i, bool(t.lstrip), bool(t.rstrip)) for i, t in tokenizer.added_tokens_decoder.items()}
    add_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return SlowLlamaEncoder(
        model_file, added, tokenizer.bos_token_id, add_bos=add_bos, legacy=released_legacy(tokenizer)
    )


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """`save_pretrained`, plus what `slow_llama_encoder` reads that transformers 5 leaves out for a
    LLaMA tokenizer (the SentencePiece model, `legacy` in tokenizer_config.json),
    so that a saved model tokenises as the one it came from."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    model_file = sentencepiece_file(tokenizer)
    if model_file is None:
        return
    if not (folder / "tokenizer.model").exists():
        shutil.copyfile(model_file, folder / "tokenizer.model")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["legacy"] = released_legacy(tokenizer)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def placeholder_pattern(tags: Mapping[str, int]) -> re.Pattern:
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True)) + ")")


def vocabulary_difference(a, b) -> str | None:
    """Why tokenizers `a` and `b` do not tokenise text alike (None when they do): every id both have
    must be the same token, and ids only one has must be its added special tokens (placeholders, pad:
    a transformers-native MLLM adds such to its base's tokenizer)."""
    shared = min(len(a), len(b))
    mine, theirs = a.convert_ids_to_tokens(list(range(shared))), b.convert_ids_to_tokens(list(range(shared)))
    for i, (x, y) in enumerate(zip(mine, theirs)):
        if x != y:
            return f"id {i} is {x!r} in one and {y!r} in the other"
    for tok in (a, b):
        special = {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
        extra = [i for i in range(shared, len(tok)) if i not in special]
        if extra:
            return f"ids {extra[:3]} of one are ordinary tokens the other lacks"
    return None


# texts whose ids tell tokenizer conventions apart: a leading word, a newline before a word, spaces,
# a role marker, digits and non-ASCII (legacy SentencePiece, prefix spaces, byte fallback)
PROBE_TEXTS = ("Hello world", "\nWhat is it?", "  two  spaces", "ASSISTANT: yes", "3.14 and 42", "café ünïcode 日本")


def convention_difference(a, b) -> str | None:
    """A text that tokenizers `a` and `b`, of one vocabulary, turn into different ids (None: none of
    `PROBE_TEXTS` does): the same vocabulary with another convention (legacy mode, prefix space)."""
    for text in PROBE_TEXTS:
        x, y = a(text, add_special_tokens=True)["input_ids"], b(text, add_special_tokens=True)["input_ids"]
        if list(x) != list(y):
            return f"{text!r} becomes {list(x)} in one and {list(y)} in the other"
    return None


def own_placeholders(tokenizer, tags: Mapping[str, int]) -> dict[str, int]:
    """The placeholder tags that are added tokens of `tokenizer` (a transformers-native MLLM's, e.g.
    llava-hf's `<image>`), with their token ids."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    return {tag: added[tag] for tag in tags if tag in added}


def tokenize_with_placeholders(
    tokenizer,
    text: str,
    tags: Mapping[str, int],
    encode: Callable[[str], list[int]] | None = None,
    add_special_tokens: bool = True,
) -> list[int]:
    """[BOS] + ids of each chunk (without its BOS) + sentinel id of each placeholder; `encode`
    tokenises one chunk with BOS (default: the tokenizer itself; see `slow_llama_encoder`).

    A placeholder that is an added token of the tokenizer is tokenised in place, as the model's own
    processor does (no chunk boundary there), then mapped to its sentinel. Without
    `add_special_tokens` (a chat template's rendering, which carries its own) no BOS is added."""
    own = own_placeholders(tokenizer, tags)
    if own or not add_special_tokens:
        encode = None  # the tokenizer itself: it knows its placeholder and special tokens
    encode = encode or (lambda chunk: list(tokenizer(chunk, add_special_tokens=add_special_tokens)["input_ids"]))
    sentinel = {own[tag]: tags[tag] for tag in own}
    split_on = {tag: v for tag, v in tags.items() if tag not in own}
    bos = tokenizer.bos_token_id if add_special_tokens else None
    ids: list[int] = [] if bos is None else [bos]
    parts = placeholder_pattern(split_on).split(text) if split_on else [text]
    for i, part in enumerate(parts):
        if i % 2 == 1:  # a captured placeholder tag
            ids.append(split_on[part])
            continue
        if not part:
            continue
        chunk = encode(part)
        if bos is not None and chunk and chunk[0] == bos:
            chunk = chunk[1:]
        ids.extend(sentinel.get(t, t) for t in chunk)
    return ids


def tokenize_continuation(tokenizer, text: str, encode: Callable[[str], list[int]] | None = None) -> list[int]:
    """A continuation (answer, option) tokenised alone, without special tokens."""
    if encode is None:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = encode(text)
    return ids[1:] if ids and ids[0] == tokenizer.bos_token_id else ids
