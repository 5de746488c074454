"""Conversation templates, kept as data in `configs/templates/*.yaml`."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Callable, Mapping, Sequence

from mcomp.resources import load_config

IGNORE_INDEX = -100  # the label of a position the loss skips (transformers' convention)


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system: str
    roles: dict[str, str]  # data role ("human", "gpt") -> rendered role ("USER", "ASSISTANT")
    sep: str
    sep2: str

    def render(self, turns: Sequence[tuple[str, str | None]]) -> str:
        """Render (role, message) turns; a turn with no message ends as "ROLE:" (the generation cue)."""
        seps = (self.sep, self.sep2)
        out = self.system + self.sep
        for i, (role, message) in enumerate(turns):
            if role not in self.roles:
                raise ValueError(f"template {self.name}: unknown role {role!r}; expected one of {sorted(self.roles)}")
            name = self.roles[role]
            if message:
                out += f"{name}: {message}{seps[i % 2]}"
            else:
                out += f"{name}:"
        return out

    def answer_labels(
        self, text: str, ids: Sequence[int], tokenize: Callable[[str], list[int]], pad_id: int | None
    ) -> tuple[list[int], str | None]:
        """Labels for `ids` (the tokens of `text`, a rendered conversation) by the published rule
        (LLaVA/ModelCompose `preprocess_v1`), and why they are all masked if they are.

        The text is cut into rounds at `sep2`, each round into instruction and answer at
        `sep + ASSISTANT + ": "`; a round spans len(tokenize(round)) tokens (its BOS stands for the
        `sep2` the cut removed) and its first len(tokenize(instruction)) - 2 tokens after the start
        are masked, as is the BOS and whatever follows the last whole round. When the rounds do not
        add up to the tokens that are not padding, the whole sample is masked (the published
        "tokenization mismatch"); the second value then says so."""
        labels = list(ids)
        labels[:1] = [IGNORE_INDEX] * len(labels[:1])
        cut = self.sep + self.roles["gpt"] + ": "
        position = 1
        for piece in text.split(self.sep2):
            if piece == "":
                break
            parts = piece.split(cut)
            if len(parts) != 2:
                break
            instruction = len(tokenize(parts[0] + cut)) - 2
            labels[position : position + instruction] = [IGNORE_INDEX] * len(labels[position : position + instruction])
            position += len(tokenize(piece))
        labels[position:] = [IGNORE_INDEX] * len(labels[position:])
        total = sum(1 for t in ids if t != pad_id)
        if position != total:
            return [IGNORE_INDEX] * len(ids), (
                f"tokenization mismatch: the rounds add up to {position} tokens, the conversation has {total}"
            )
        return labels, None

    def prompt(self, question: str) -> str:
        """The generation prompt for one user message: `<system> USER: <question> ASSISTANT:`."""
        return self.render([("human", question), ("gpt", None)])


@lru_cache(maxsize=None)
def get_template(name: str) -> ConversationTemplate:
    try:
        data = load_config("templates", f"{name}.yaml")
    except FileNotFoundError:
        raise ValueError(f"unknown conversation template {name!r} (no configs/templates/{name}.yaml)") from None
    return ConversationTemplate(**data)


def conversation_turns(turns: Sequence[Mapping]) -> list[tuple[str, str | None]]:
    """A conversation list (`[{from, value}]`) as the published preprocess takes it: a first turn
    that is not the human's is dropped, and the rest must alternate human, gpt, human, ...
    (a gpt turn may have no value: it then ends the text as the generation cue)."""
    pairs = [(t.get("from"), t.get("value")) for t in turns]
    if pairs and pairs[0][0] != "human":
        pairs = pairs[1:]
    for k, (role, _) in enumerate(pairs):
        expected = ("human", "gpt")[k % 2]
        if role != expected:
            shift = 1 if len(turns) > len(pairs) else 0
            raise ValueError(
                f"conversations[{k + shift}] is from {role!r} where {expected!r} is expected: turns "
                f"alternate human, gpt, ... (a first turn not from the human is skipped)"
            )
    return pairs
