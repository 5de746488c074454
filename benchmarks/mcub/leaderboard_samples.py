"""The runs' per-sample records, packed compactly for the leaderboard page's drill-down.

Read from each run's `samples.jsonl` (or, for a run not gathered yet, its per-process shard files).
A question is stored once however many runs answered it: its subset, id, text, answer, the options
unless the text lists them as "A. text" lines, and, when the records name them, the media files.
Its prompt is split into the text and four parts stored once, as the question's template: the
conversation template's wrapper before and after the human turn (found by rendering the run's
template, named in results.json, around a probe), and the leading and trailing lines that every
question of that run and subset shares (placeholders, a question that is always the same, the answer
instruction). The page shows the human turn (head + text + tail) and still has the whole prompt.
Each run keeps only what differs between runs: its predictions and whether each is correct, for both
scores of a log-likelihood run (`prediction`; `prediction_norm`, behind `accuracy_norm`), plus errors
and generated responses.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

from mcomp.benchmarks.mcub.records import read_records
from mcomp.conversation import get_template

logger = logging.getLogger(__name__)

# metric -> (prediction field, correct field) of the per-sample records (runner: accuracy_norm uses *_norm)
METRIC_FIELDS = {"accuracy": ("prediction", "correct"), "accuracy_norm": ("prediction_norm", "correct_norm")}


def run_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """A run's per-sample records in question-file order: the gathered file, else the shards."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        run_dir = run_dir.parent  # a results.json given for its run
    final = run_dir / "samples.jsonl"
    if final.is_file():
        return read_records(final)
    records = [r for part in sorted(run_dir.glob("samples.part-*.jsonl")) for r in read_records(part)]
    return sorted(records, key=lambda r: (str(r.get("subset")), r.get("index", 0)))


def _shared_lines(texts: list[str]) -> tuple[str, str]:
    """The leading and trailing whole lines all distinct texts share; nothing when there is one."""
    distinct = sorted(set(texts))
    if len(distinct) < 2:
        return "", ""
    split = [p.splitlines(keepends=True) for p in distinct]
    shortest = min(len(lines) for lines in split)
    head = 0
    while head < shortest and all(lines[head] == split[0][head] for lines in split):
        head += 1
    tail = 0
    while tail < shortest - head and all(lines[-1 - tail] == split[0][-1 - tail] for lines in split):
        tail += 1
    return "".join(split[0][:head]), "".join(split[0][len(split[0]) - tail :])


def template_wrapper(name: str | None) -> tuple[str, str]:
    """The text a conversation template puts before and after a one-turn question ("<system> USER: ",
    " ASSISTANT:"); nothing for a template not shipped with mcomp (e.g. a model's own chat template)."""
    probe = "\x00"
    try:
        text = get_template(str(name)).render([("human", probe), ("gpt", None)])
    except (ValueError, TypeError, KeyError) as err:
        logger.debug("template %r: prompts shown whole (%s)", name, err)
        return "", ""
    before, _, after = text.partition(probe)
    return before, after


def _compact(values: list[Any]) -> str | list[Any]:
    """One-character strings as one string (indexable alike in JavaScript), else the list itself."""
    if values and all(isinstance(v, str) and len(v) == 1 for v in values):
        return "".join(values)
    return values


def _media_names(record: dict[str, Any]) -> dict[str, list[str]] | None:
    media = record.get("media")
    if not isinstance(media, dict):
        return None
    return {str(k): [Path(str(p)).name for p in (v if isinstance(v, list) else [v])] for k, v in sorted(media.items())}


class SamplePacker:
    """Collects runs' records into the page's compact form: `add` each run, then `payload`."""

    def __init__(self):
        # [wrapper before, shared head, shared tail, wrapper after]: the prompt parts a run's questions of one
        # subset share; prompt = wrapper before + head + text + tail + wrapper after
        self.templates: list[list[str]] = []
        self.questions: list[dict[str, Any]] = []
        self.question_lists: list[list[int]] = []  # the questions of a run, in order (shared by runs alike)
        self.runs: list[dict[str, Any]] = []
        self._template_index: dict[tuple[str, ...], int] = {}
        self._question_index: dict[str, int] = {}
        self._list_index: dict[tuple[int, ...], int] = {}

    def _intern(self, index: dict, key, table: list, value) -> int:
        if key not in index:
            index[key] = len(table)
            table.append(value)
        return index[key]

    def add(self, run_dir: str | os.PathLike, template: str | None = None) -> int:
        """Adds a run's records (`template`: the name of the conversation template its prompts were rendered
        with); returns the run's index in the payload."""
        records = run_records(run_dir)
        before, after = template_wrapper(template)
        turns: dict[str, list[str]] = {}  # subset -> the human turns of its prompts
        for r in records:
            prompt = r.get("prompt")
            if not isinstance(prompt, str):
                r["prompt"] = None
                continue
            wrapped = prompt.startswith(before) and prompt.endswith(after) and len(prompt) >= len(before + after)
            r["prompt"] = (
                (before, prompt[len(before) : len(prompt) - len(after)], after) if wrapped else ("", prompt, "")
            )
            turns.setdefault(str(r.get("subset")), []).append(r["prompt"][1])
        shared = {subset: _shared_lines(texts) for subset, texts in turns.items()}
        order = []
        for r in records:
            order.append(self._question(r, shared.get(str(r.get("subset")), ("", ""))))
        run: dict[str, Any] = {"name": Path(run_dir).name, "questions": self._list(order)}
        for metric, (prediction, correct) in METRIC_FIELDS.items():
            if any(prediction in r for r in records):
                run[metric] = {
                    "prediction": _compact([r.get(prediction) for r in records]),
                    "correct": "".join("1" if r.get(correct) else "0" for r in records),
                }
        errors = {str(i): str(r["error"]) for i, r in enumerate(records) if r.get("error")}
        if errors:
            run["errors"] = errors
        if any(r.get("response") is not None for r in records):
            run["responses"] = [r.get("response") for r in records]
        self.runs.append(run)
        logger.debug("%s: %d records", run_dir, len(records))
        return len(self.runs) - 1

    def _list(self, order: list[int]) -> int:
        return self._intern(self._list_index, tuple(order), self.question_lists, order)

    def _question(self, record: dict[str, Any], shared: tuple[str, str]) -> int:
        """`record["prompt"]`: (wrapper before, human turn, wrapper after), or None (the sample failed)."""
        before, turn, after = record["prompt"] or ("", None, "")
        head, tail = shared if turn is not None else ("", "")
        parts = (before, head, tail, after)
        question: dict[str, Any] = {
            "subset": record.get("subset"),
            "id": record.get("id"),
            "text": turn[len(head) : len(turn) - len(tail)] if turn is not None else None,
            "template": self._intern(self._template_index, parts, self.templates, list(parts)),
            "answer": record.get("target"),
        }
        options = record.get("option_scores")
        if isinstance(options, list):
            pairs = [[o.get("key"), o.get("continuation")] for o in options if isinstance(o, dict)]
            lines = set((question["text"] or "").splitlines())
            if not all(f"{key}. {text}" in lines for key, text in pairs):  # else the text lists them already
                question["options"] = pairs
        media = _media_names(record)
        if media is not None:
            question["media"] = media
        key = repr(sorted(question.items()))  # the same question of another run: stored once
        return self._intern(self._question_index, key, self.questions, question)

    def payload(self) -> dict[str, Any]:
        return {
            "templates": self.templates,
            "questions": self.questions,
            "question_lists": self.question_lists,
            "runs": self.runs,
        }


def pack_samples(runs: Iterable[tuple[str | os.PathLike, str | None]]) -> dict[str, Any]:
    """The compact per-sample payload of `runs` ((run directory, its template's name) pairs), in order."""
    packer = SamplePacker()
    for run_dir, template in runs:
        packer.add(run_dir, template)
    return packer.payload()
