"""LLaVA-style conversation data: `[{id, conversations: [{from, value}], modal_inputs: {key: [paths]}}]`.

Optional per sample, `media_captions: {key: [text]}`: for each media file, text that can stand in for
it (the world's captions); stage-1 caption distillation (`TrainConfig.caption_distill`) reads it."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class ConversationSample:
    id: Any
    conversations: list[dict[str, Any]]
    media: dict[str, list[str]]  # modality key (as in the file) -> absolute paths
    captions: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # key -> one text per media file


def load_conversation_data(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> list[ConversationSample]:
    """Read and validate a conversation JSON; media paths are resolved against `data_root`
    (default: the JSON file's folder). Errors name the file, the sample and the field."""
    path = Path(path)
    root = Path(data_root) if data_root is not None else path.parent
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"training data {path} not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of samples, got {type(items).__name__}")
    samples = []
    for index, item in enumerate(items):
        where = f"{path}: sample {item.get('id', index) if isinstance(item, dict) else index}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object")
        turns = item.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: field 'conversations' must be a non-empty list")
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt"):
                raise ValueError(f"{where}: conversations[{k}] needs 'from' = 'human' or 'gpt'")
            if turn.get("value") is not None and not isinstance(turn["value"], str):
                raise ValueError(f"{where}: conversations[{k}].value must be a string or null")
        media_in = item.get("modal_inputs") or {}
        if not isinstance(media_in, dict):
            raise ValueError(f"{where}: field 'modal_inputs' must be an object of modality -> list of paths")
        media = {}
        for key, files in media_in.items():
            files = [files] if isinstance(files, str) else files
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise ValueError(f"{where}: modal_inputs[{key!r}] must be a path or a list of paths")
            media[key] = [str(root / f) for f in files]
        captions = item.get("media_captions") or {}
        if not isinstance(captions, dict):
            raise ValueError(f"{where}: field 'media_captions' must be an object of modality -> list of texts")
        for key, texts in captions.items():
            if key not in media or not isinstance(texts, list) or len(texts) != len(media[key]) \
                    or not all(isinstance(t, str) and t for t in texts):
                raise ValueError(f"{where}: media_captions[{key!r}] must be one non-empty text per file of "
                                 f"modal_inputs[{key!r}]")
        samples.append(ConversationSample(item.get("id", index), turns, media, captions))
    return samples
