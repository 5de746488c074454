"""Files shipped in `mcomp.configs` (templates, model shapes, tasks)."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml


def config_file(*parts: str) -> Path:
    path = Path(str(files("mcomp.configs").joinpath(*parts)))
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config {'/'.join(parts)} (looked in {path.parent})")
    return path


def load_config(*parts: str) -> Any:
    path = config_file(*parts)
    with open(path, encoding="utf-8") as f:
        return json.load(f) if path.suffix == ".json" else yaml.safe_load(f)
