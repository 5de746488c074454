"""Reading the published benchmark files (MCUB, AVQA, MUSIC-AVQA, ModelNet40) as they are.

Question file: a JSON list; each entry has `id` (any JSON scalar), `conversations` (a list of
{"from": "human"|"gpt", "value": ...}, rendered whole into the prompt; the first human turn is the
question, which options functions read) and
`modal_inputs` ({"vision"|"audio"|"video"|"point": [paths]}). Extra fields are ignored.
Answer file: a JSON list of {"id", "conversations"} (reference = the last turn's value) or of
{"id", "label", "label_name"} (ModelNet40 annotations).

Relative media paths are resolved against the data root. A sample whose media file is missing, or
whose media path leads outside the data root ('..', an absolute path, a symlink), is kept with `error`
set, so it is recorded and counted, never dropped; `allow_outside_root=True`
(`mcomp eval --allow-media-outside-root`) lets media paths lead anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mcomp.conversation import conversation_turns
from mcomp.data import entry_media, entry_turns
from mcomp.modalities import MODALITIES
from mcomp.resources import read_document

logger = logging.getLogger(__name__)

# for stable column order only: each modality's published key, then its name
MEDIA_KEYS_ORDER = tuple(dict.fromkeys(k for m in MODALITIES.values() for k in (m.published_key, m.name)))


def id_key(sample_id: Any) -> str:
    """A hashable, type-exact key for a JSON id (1, 1.0, "1" and true are different ids)."""
    return json.dumps(sample_id, sort_keys=True)


@dataclasses.dataclass
class Sample:
    id: Any
    subset: str
    index: int  # position in its question file
    question: str  # the first human turn, verbatim (it holds the placeholders)
    media: dict[str, list[str]]  # key as in the file ("vision", "audio", ...) -> resolved paths
    error: str | None = None  # set when the sample cannot be run (e.g. a missing media file)
    # the whole conversation as (role, value) pairs, as the published preprocess takes it (a first
    # turn not from the human dropped); empty: the question alone, then the generation cue
    turns: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self):
        if not self.turns:
            self.turns = (("human", self.question), ("gpt", None))

    @property
    def key(self) -> tuple[str, str]:
        return (self.subset, id_key(self.id))


def conversation(question: str, answer: str | None) -> list[dict[str, Any]]:
    """A one-round conversation as the released files hold it (`answer` None: the question file's
    empty assistant turn)."""
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def question_entry(sample_id: Any, question: str, modal_inputs: Mapping[str, list[str]]) -> dict[str, Any]:
    """One entry of a question file (what `read_questions` reads)."""
    return {"id": sample_id, "conversations": conversation(question, None), "modal_inputs": dict(modal_inputs)}


def answer_entry(sample_id: Any, question: str, answer: Any) -> dict[str, Any]:
    """One entry of an answer file in the conversation form (the reference is the last turn's value)."""
    return {"id": sample_id, "conversations": conversation(question, answer)}


def resolve_media_path(path: str, data_root: str | os.PathLike | None) -> str:
    if os.path.isabs(path) or data_root is None:
        return path
    return os.path.join(os.fspath(data_root), path)


def outside_root(path: str, data_root: str | os.PathLike) -> str | None:
    """Where `path` really is (symlinks resolved) if that is outside the data root's real path, else None."""
    root = os.path.realpath(data_root)
    real = os.path.realpath(path)
    try:
        inside = os.path.commonpath([root, real]) == root
    except ValueError:  # e.g. another drive on Windows
        inside = False
    return None if inside else real


def _check_scalar_id(path: Path, i: int, entry: Mapping) -> Any:
    if "id" not in entry:
        raise ValueError(f"{path}: entry {i} has no 'id' field")
    sample_id = entry["id"]
    if isinstance(sample_id, (dict, list)) or sample_id is None:
        raise ValueError(f"{path}: entry {i}: 'id' must be a JSON scalar (string or number), got {sample_id!r}")
    return sample_id


def first_human_turn(turns: Sequence[Mapping], where: str) -> str:
    """The question: the first human turn's value (checked turns, see `mcomp.data.entry_turns`)."""
    for k, turn in enumerate(turns):
        if turn["from"] == "human":
            value = turn.get("value")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: conversations[{k}].value (the question) must be a non-empty string")
            return value
    raise ValueError(f"{where}: no 'human' turn in 'conversations'")


def read_questions(
    path: str | os.PathLike,
    subset: str,
    data_root: str | os.PathLike | None = None,
    check_files: bool = True,
    allow_outside_root: bool = False,
) -> list[Sample]:
    """All samples of a question file, in file order. Malformed entries raise; missing media, and media
    paths that lead outside `data_root` (unless `allow_outside_root`), mark the sample with an error.
    Without a `data_root` there is nothing to confine the paths to."""
    path = Path(path)
    data = read_document(path, "question file", list)
    samples, seen = [], {}
    confine = data_root is not None and not allow_outside_root
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{path}: entry {i} must be an object, got {type(entry).__name__}")
        sample_id = _check_scalar_id(path, i, entry)
        k = id_key(sample_id)
        if k in seen:
            raise ValueError(f"{path}: id {sample_id!r} occurs twice (entries {seen[k]} and {i}); ids must be unique")
        seen[k] = i
        where = f"{path}: entry {i} (id {sample_id!r})"
        checked = entry_turns(entry, where)
        question = first_human_turn(checked, where)
        try:
            turns = conversation_turns(checked)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        media: dict[str, list[str]] = {}
        written: list[tuple[str, str, str]] = []  # (key, path as in the file, resolved path)
        for key, items in entry_media(entry, where).items():
            if items:
                media[key] = [resolve_media_path(s, data_root) for s in items]
                written += [(key, s, r) for s, r in zip(items, media[key])]
        error, outside = None, []
        if confine:
            outside = [
                f"{key} file {given} resolves to {real}"
                for key, given, resolved in written
                if (real := outside_root(resolved, data_root)) is not None
            ]
        if outside:  # the sample fails before any of its files is opened
            error = (
                f"media outside the data root {os.path.realpath(data_root)}: {'; '.join(outside)} "
                f"(mcomp eval --allow-media-outside-root allows it)"
            )
        elif check_files:
            missing = [f"{key} file {p}" for key, paths in media.items() for p in paths if not os.path.isfile(p)]
            if missing:
                error = "missing media: " + "; ".join(missing)
        samples.append(Sample(sample_id, subset, i, question, media, error, tuple(turns)))
    logger.info(
        "%s: %d sample(s), %d with unusable media", path, len(samples), sum(s.error is not None for s in samples)
    )
    return samples


def read_answer_file(path: str | os.PathLike) -> dict[str, dict]:
    """Answer-key entries by `id_key`. Conflicting duplicates raise; identical ones are tolerated."""
    path = Path(path)
    data = read_document(path, "answer file", list)
    out: dict[str, dict] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{path}: entry {i} must be an object, got {type(entry).__name__}")
        sample_id = _check_scalar_id(path, i, entry)
        k = id_key(sample_id)
        if k in out and out[k] != entry:
            raise ValueError(f"{path}: id {sample_id!r} occurs twice with different content")
        out[k] = dict(entry, _entry_index=i)
    return out


def check_answers_match(
    samples: Sequence[Sample], answers: Mapping[str, dict], answer_path: str | os.PathLike, question_path: str
) -> list[Sample]:
    """Raise when the answer key matches none of the questions; return the samples it lacks (scored wrong)."""
    missing = [s for s in samples if id_key(s.id) not in answers]
    if samples and len(missing) == len(samples):
        example = ", ".join(repr(s.id) for s in samples[:3])
        raise ValueError(
            f"answer file {answer_path} does not match question file {question_path}: none of its "
            f"{len(samples)} question id(s) (e.g. {example}) is in the answer file ({len(answers)} entries)"
        )
    if missing:
        logger.warning(
            "%s: %d of %d question id(s) are missing from %s; they count as wrong (e.g. %r)",
            question_path,
            len(missing),
            len(samples),
            answer_path,
            missing[0].id,
        )
    return missing


def as_hf_dataset(samples: Iterable[Sample], answers: Mapping[str, dict] | None = None, target_fn=None):
    """The samples as a `datasets.Dataset` (one row per sample, one list column per media key).

    Ids are stored as their JSON text (`id`) so mixed-type ids fit one column; `target` is the
    reference answer when an answer key (and the function extracting the target) is given.
    """
    import datasets

    samples = list(samples)
    keys = sorted(
        {k for s in samples for k in s.media},
        key=lambda k: (MEDIA_KEYS_ORDER.index(k) if k in MEDIA_KEYS_ORDER else len(MEDIA_KEYS_ORDER), k),
    )
    rows = []
    for s in samples:
        row = {"id": id_key(s.id), "subset": s.subset, "index": s.index, "question": s.question}
        for k in keys:
            row[k] = list(s.media.get(k, []))
        entry = answers.get(id_key(s.id)) if answers is not None else None
        row["target"] = target_fn(entry) if (entry is not None and target_fn is not None) else None
        row["error"] = s.error
        rows.append(row)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "subset": datasets.Value("string"),
            "index": datasets.Value("int64"),
            "question": datasets.Value("string"),
            **{k: datasets.Sequence(datasets.Value("string")) for k in keys},
            "target": datasets.Value("string"),
            "error": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)
