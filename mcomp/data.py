"""LLaVA-style conversation data: `[{id, conversations: [{from, value}], modal_inputs: {key: [paths]}}]`.

Optional per sample, `media_captions: {key: [text]}`: for each media file, text that can stand in for
it (the world's captions); stage-1 caption distillation (`TrainConfig.caption_distill`) reads it.

`check_training_data` checks samples against the model that will train on them, before any step:
every media file decodes, placeholders match the media, media stay inside the data root."""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from mcomp.resources import read_document


@dataclasses.dataclass
class ConversationSample:
    id: Any
    conversations: list[dict[str, Any]]
    media: dict[str, list[str]]  # modality key (as in the file) -> absolute paths
    captions: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # key -> one text per media file
    root: str | None = None  # the data root the media paths were resolved against (None: not known)


class TrainingDataError(ValueError):
    """Training data that cannot be used as given; the message names each sample, field and file."""


def entry_turns(entry: Mapping, where: str) -> list[dict[str, Any]]:
    """An entry's `conversations`, checked: a non-empty list of {from, value}, each value a string or
    null. `where` names the file and the entry in errors."""
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list")
    for k, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn:
            raise ValueError(f"{where}: conversations[{k}] has no 'from' field")
        if turn.get("value") is not None and not isinstance(turn["value"], str):
            raise ValueError(f"{where}: conversations[{k}].value must be a string or null")
    return turns


def entry_media(entry: Mapping, where: str) -> dict[str, list[str]]:
    """An entry's `modal_inputs` as modality key -> the paths as written (one path may stand alone)."""
    media_in = entry.get("modal_inputs") or {}
    if not isinstance(media_in, Mapping):
        raise ValueError(f"{where}: field 'modal_inputs' must be an object of modality key -> list of paths")
    media = {}
    for key, files in media_in.items():
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError(f"{where}: modal_inputs[{key!r}] must be a path or a list of paths")
        media[key] = files
    return media


def load_conversation_data(
    path: str | os.PathLike, data_root: str | os.PathLike | None = None
) -> list[ConversationSample]:
    """Read and validate a conversation JSON; media paths are resolved against `data_root`
    (default: the JSON file's folder). Errors name the file, the sample and the field."""
    path = Path(path)
    root = Path(data_root) if data_root is not None else path.parent
    samples = []
    for index, item in enumerate(read_document(path, "training data", list)):
        where = f"{path}: sample {item.get('id', index) if isinstance(item, dict) else index}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object")
        turns = entry_turns(item, where)
        for k, turn in enumerate(turns):
            if turn["from"] not in ("human", "gpt"):
                raise ValueError(f"{where}: conversations[{k}] needs 'from' = 'human' or 'gpt'")
        media = {key: [str(root / f) for f in files] for key, files in entry_media(item, where).items()}
        captions = item.get("media_captions") or {}
        if not isinstance(captions, dict):
            raise ValueError(f"{where}: field 'media_captions' must be an object of modality -> list of texts")
        for key, texts in captions.items():
            if (
                key not in media
                or not isinstance(texts, list)
                or len(texts) != len(media[key])
                or not all(isinstance(t, str) and t for t in texts)
            ):
                raise ValueError(
                    f"{where}: media_captions[{key!r}] must be one non-empty text per file of modal_inputs[{key!r}]"
                )
        samples.append(ConversationSample(item.get("id", index), turns, media, captions, str(root)))
    return samples


def _relative(path: str, root: str | None) -> str:
    """`path` relative to the data root where it lies inside it, else absolute (so that moving the
    whole data folder changes the root alone)."""
    absolute = os.path.abspath(path)
    if root is not None:
        base = os.path.abspath(root)
        if absolute == base or absolute.startswith(base.rstrip(os.sep) + os.sep):
            return os.path.relpath(absolute, base)
    return absolute


def samples_digest(samples: Sequence[ConversationSample]) -> str:
    """sha256 over every sample's id, turns, media paths (relative to its data root) and captions."""
    from mcomp.fingerprint import fingerprint

    return fingerprint(
        [
            [s.id, s.conversations, {k: [_relative(f, s.root) for f in v] for k, v in s.media.items()}, s.captions]
            for s in samples
        ]
    )


def media_digest(samples: Sequence[ConversationSample]) -> str:
    """sha256 over the list of distinct media files (path relative to the data root, size in bytes;
    -1 for a file that cannot be read): cheap, no file is read."""
    from mcomp.fingerprint import fingerprint

    listing = {}
    for s in samples:
        for files in s.media.values():
            for f in files:
                name = _relative(f, s.root)
                if name not in listing:
                    try:
                        listing[name] = os.stat(f).st_size
                    except OSError:
                        listing[name] = -1
    return fingerprint(sorted(listing.items()))


# Files this process has decoded without error, by (adapter type and config, real path, size, mtime):
# a run that trains several times on the same data (the zoo: stage 1, then two stage-2 flavours)
# decodes each file once; a file changed since reads as another file.
_DECODED: set[tuple] = set()


def _decode_key(adapter, real: str) -> tuple | None:
    try:
        st = os.stat(real)
    except OSError:
        return None
    from mcomp.fingerprint import canonical_json

    return (type(adapter).__qualname__, canonical_json(adapter.config.to_dict()), real, st.st_size, st.st_mtime_ns)


def check_training_data(
    samples: Sequence[ConversationSample],
    model,
    *,
    allow_media_outside_root: bool = False,
    progress: bool = True,
    limit: int = 20,
) -> None:
    """Refuse, before any training step, data the model cannot train on; every problem found is
    reported at once (the first `limit`), each naming the sample id, the field and the file.

    - each media key names a modality of `model`, and the placeholders in a sample's human turns
      match its media files, per modality (answers hold none);
    - the turns alternate as the template needs and tokenise into labels by its rule
      (`MultimodalLM.conversation_ids`: an answer to learn, no tokenization mismatch);
    - each media file lies inside its sample's data root, symlinks resolved (not checked for
      samples without a root, or with `allow_media_outside_root`);
    - each media file decodes with its modality's adapter (`input_tensor`: read and preprocess),
      once per distinct file however many samples use it (and once per process: `_DECODED`)."""
    from mcomp.errors import PlaceholderMismatchError
    from mcomp.progress import progress_bar
    from mcomp.tokenization import placeholder_pattern

    problems: list[str] = []
    tag_modality = {adapter.placeholder: modality for modality, adapter in model.adapters.items()}
    pattern = placeholder_pattern(tag_modality) if tag_modality else None
    users: dict[tuple[str, str], list[str]] = defaultdict(list)  # (modality, real path) -> "sample ..: field 'file'"
    first_path: dict[tuple[str, str], str] = {}
    roots: dict[str, Path] = {}
    for s in samples:
        have: dict[str, int] = defaultdict(int)
        root = None
        if s.root is not None and not allow_media_outside_root:
            root = roots.setdefault(s.root, Path(s.root).resolve())
        for key, files in s.media.items():
            try:
                modality = model.modality_of(key)
            except PlaceholderMismatchError as err:
                problems.append(f"sample {s.id}: modal_inputs[{key!r}]: {err}")
                continue
            have[modality] += len(files)
            for k, f in enumerate(files):
                where = f"sample {s.id}: modal_inputs[{key!r}][{k}] '{f}'"
                real = Path(f).resolve()
                if root is not None and not real.is_relative_to(root):
                    problems.append(
                        f"{where} resolves to {real}, outside the data root {root} "
                        f"(--allow-media-outside-root / allow_media_outside_root=True allows it)"
                    )
                    continue
                users[(modality, str(real))].append(where)
                first_path.setdefault((modality, str(real)), f)
        want: dict[str, int] = defaultdict(int)
        for k, turn in enumerate(s.conversations):
            tags = pattern.findall(turn.get("value") or "") if pattern is not None else []
            if turn.get("from") == "human":
                for tag in tags:
                    want[tag_modality[tag]] += 1
            elif tags:
                problems.append(
                    f"sample {s.id}: conversations[{k}] is an answer but holds the placeholder(s) "
                    f"{', '.join(sorted(set(tags)))}; media go in the human turns"
                )
        try:
            model.conversation_ids(s.conversations)
        except ValueError as err:
            problems.append(f"sample {s.id}: {getattr(err, 'reason', err)}")
        for modality in sorted(set(have) | set(want)):
            if have[modality] != want[modality]:
                files = [f for key, v in s.media.items() if _modality_or_none(model, key) == modality for f in v]
                problems.append(
                    f"sample {s.id}: the human turns hold {want[modality]} "
                    f"{model.adapters[modality].placeholder} placeholder(s) but modal_inputs gives "
                    f"{have[modality]} {modality} file(s) ({', '.join(files) or 'none'})"
                )
    bar = progress_bar(total=len(users), desc="check training media", unit="file", enabled=progress)
    for (modality, real), places in users.items():
        adapter = model.adapters[modality]
        key = _decode_key(adapter, real)
        if key is None or key not in _DECODED:
            try:
                adapter.input_tensor(first_path[(modality, real)])
                if key is not None:
                    _DECODED.add(key)
            except Exception as err:  # a plug-in adapter may fail in its own way: report it with the rest
                reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
                problems += [f"{place}: {reason}" for place in places]
        bar.update(1)
    bar.close()
    if problems:
        more = len(problems) - limit
        raise TrainingDataError(
            f"{len(problems)} problem(s) in the training data, found before training:\n  "
            + "\n  ".join(problems[:limit])
            + (f"\n  ... and {more} more" if more > 0 else "")
        )


def _modality_or_none(model, key: str) -> str | None:
    try:
        return model.modality_of(key)
    except ValueError:
        return None
