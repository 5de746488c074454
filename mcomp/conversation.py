"""Conversation templates, kept as data in `configs/templates/*.yaml`."""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Sequence

from mcomp.resources import load_config


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

    def segments(self, turns: Sequence[tuple[str, str | None]]) -> list[tuple[str, bool]]:
        """The rendered text cut into (text, is_answer) pieces; joined, they equal `render(turns)`.

        An answer piece is the assistant's message plus its separator (what training predicts).
        """
        seps = (self.sep, self.sep2)
        out: list[tuple[str, bool]] = []
        context = self.system + self.sep
        for i, (role, message) in enumerate(turns):
            if role not in self.roles:
                raise ValueError(f"template {self.name}: unknown role {role!r}; expected one of {sorted(self.roles)}")
            name = self.roles[role]
            if not message:
                context += f"{name}:"
            elif role == "gpt":
                out += [(context + f"{name}:", False), (f" {message}{seps[i % 2]}", True)]
                context = ""
            else:
                context += f"{name}: {message}{seps[i % 2]}"
        if context:
            out.append((context, False))
        return out

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
