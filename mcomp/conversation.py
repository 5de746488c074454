"""Conversation templates: the published ones, kept as data in `configs/templates/*.yaml`, and a base
LLM's own chat template (`ChatTemplate`, template name "chat": its tokenizer's jinja template)."""

from __future__ import annotations

import dataclasses
import os
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

    add_special_tokens = True  # tokenising a rendering adds the tokenizer's BOS (the template has none)

    def answer_labels(
        self,
        text: str,
        ids: Sequence[int],
        tokenize: Callable[[str], list[int]],
        pad_id: int | None,
        pairs: Sequence[tuple[str, str | None]] = (),
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


CHAT = "chat"  # the template name of a base LLM's own chat template
ROLES = {"human": "user", "gpt": "assistant"}


class ChatTemplate:
    """A base LLM's own chat template (`tokenizer.chat_template`, rendered by `apply_chat_template`),
    with the interface of `ConversationTemplate`. Placeholders stay in the message text as they are,
    so each becomes one sentinel wherever the template puts the message. The rendering carries its own
    special tokens (BOS, turn markers), so it is tokenised without adding any."""

    name = CHAT
    add_special_tokens = False

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template (tokenizer_config.json / chat_template.jinja): use a "
                "template of configs/templates (e.g. vicuna_v1) or give the tokenizer its template"
            )
        self.tokenizer = tokenizer
        probe = "<probe-placeholder>\nWhat is it?"
        if self.prompt(probe).count(probe) != 1:
            raise ValueError(
                "the tokenizer's chat template does not keep a user message's text as it is, so it cannot place "
                "a media placeholder: use a template of configs/templates (e.g. vicuna_v1) instead"
            )
        self.end_of_turn = self._end_of_turn()

    def render(self, turns: Sequence[tuple[str, str | None]]) -> str:
        """Render (role, message) turns; a last turn from "gpt" with no message is the generation prompt."""
        turns = list(turns)
        generate = bool(turns) and turns[-1][0] == "gpt" and not turns[-1][1]
        if generate:
            turns = turns[:-1]
        messages = []
        for role, message in turns:
            if role not in ROLES:
                raise ValueError(f"chat template: unknown role {role!r}; expected one of {sorted(ROLES)}")
            messages.append({"role": ROLES[role], "content": message or ""})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generate)

    def prompt(self, question: str) -> str:
        return self.render([("human", question), ("gpt", None)])

    def answer_labels(
        self,
        text: str,
        ids: Sequence[int],
        tokenize: Callable[[str], list[int]],
        pad_id: int | None,
        pairs: Sequence[tuple[str, str | None]] = (),
    ) -> tuple[list[int], str | None]:
        """Labels for `ids` (the tokens of `text`, the rendering of `pairs`): the tokens each answer adds
        to the rendering, its end-of-turn tokens included, found by rendering the conversation up to
        the answer's generation prompt and up to the answer (as far as the whole rendering agrees with
        it); all else is masked. A template that does
        not render a conversation prefix by prefix (or a tokenizer that does not tokenise those
        prefixes as prefixes) masks the whole sample and says why."""
        labels = [IGNORE_INDEX] * len(ids)
        for k, (role, message) in enumerate(pairs):
            if role != "gpt" or not message:
                continue
            before = self.render([*pairs[:k], ("gpt", None)])
            through = self.render(pairs[: k + 1])
            if not (through.startswith(before) and text.startswith(before)):
                return [IGNORE_INDEX] * len(ids), "the chat template does not render the conversation prefix by prefix"
            if not self._kept_whole(text, through, len(before), message):
                # the answer is rendered otherwise once more turns follow (Qwen3 drops the empty think
                # block of earlier answers): its tokens are its text and end-of-turn in the whole rendering
                through = self._answer_in(text, through, len(before), message)
                if through is None:
                    return [IGNORE_INDEX] * len(ids), "the chat template does not keep an answer's text"
            start, stop = tokenize(before), tokenize(through)
            if list(ids[: len(start)]) != start or stop[: len(start)] != start:
                return [IGNORE_INDEX] * len(ids), (
                    "tokenization mismatch: the rendering up to an answer does not tokenise as a prefix of the whole"
                )
            # the answer's tokens as far as the whole conversation keeps them (a template may end a
            # conversation with an EOS, but not an answer that more turns follow)
            end = len(start)
            while end < min(len(stop), len(ids)) and stop[end] == ids[end]:
                end += 1
            labels[len(start) : end] = ids[len(start) : end]
        return labels, None

    @staticmethod
    def _kept_whole(text: str, through: str, start: int, message: str) -> bool:
        """Whether the whole rendering agrees with the rendering up to this answer through the answer's text."""
        found = through.find(message.strip(), start)
        if found < 0:
            return False
        end = found + len(message.strip())
        return text[start:end] == through[start:end]

    def _answer_in(self, text: str, through: str, start: int, message: str) -> str | None:
        """The whole rendering up to the end of the answer that begins at `start`: its text, the end-of-turn
        tokens right after it, and the white space that follows them in both renderings alike (a newline);
        None if the text is not there."""
        marker = "".join(self.tokenizer.convert_ids_to_tokens(self.end_of_turn))

        def turn_end(rendering: str) -> int:
            found = rendering.find(message.strip(), start)
            if found < 0:
                return -1
            end = found + len(message.strip())
            return end + len(marker) if marker and rendering.startswith(marker, end) else end

        end, own_end = turn_end(text), turn_end(through)
        if end < 0 or own_end < 0:
            return None
        common = os.path.commonprefix([text[end:], through[own_end:]])
        return text[: end + len(common) - len(common.lstrip())]

    @property
    def sep2(self) -> str:
        """Text that ends an answer (generations are cut there): the first end-of-turn token's text."""
        return self.tokenizer.convert_ids_to_tokens(self.end_of_turn[0]) if self.end_of_turn else ""

    def _end_of_turn(self) -> list[int]:
        """The special tokens the template puts right after an answer (e.g. <|im_end|>, <|eot_id|>,
        <end_of_turn>, </s>): generation stops at them."""
        probe = "§"
        text = self.render([("human", "?"), ("gpt", probe)])
        after = text[text.rindex(probe) + len(probe) :]
        ids = self.tokenizer(after, add_special_tokens=False)["input_ids"]
        special = set(self.tokenizer.all_special_ids)
        out = []
        for t in ids:
            if t not in special:
                if out:
                    break
                continue
            out.append(t)
        return out


def template_for(name: str, tokenizer) -> ConversationTemplate | ChatTemplate:
    """The template `name`: the tokenizer's own chat template for "chat", else a shipped one."""
    return ChatTemplate(tokenizer) if name == CHAT else get_template(name)


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
