"""JSON and YAML documents: the files shipped in `mcomp.configs` (templates, model shapes, tasks) and the
user's own (training data, task and merge configs, results)."""

from __future__ import annotations

import json
import os
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
    return read_document(config_file(*parts), "shipped config", object)


def read_document(path: str | os.PathLike, what: str, kind: type = dict) -> Any:
    """The JSON (or, for .yaml/.yml, YAML) document in `path`, which must be a `kind` (dict or list)
    at the top level; errors name the file and what it was meant to be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    text = path.read_text(encoding="utf-8")
    syntax = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
    if syntax == "YAML":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: {what} is not valid YAML ({err})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(data, kind):
        shape = f"a {syntax} list" if kind is list else f"a {syntax} object (mapping)"
        raise ValueError(f"{path}: {what} must be {shape} at the top level, got {type(data).__name__}")
    return data
