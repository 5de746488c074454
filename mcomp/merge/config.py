"""The mergekit-style YAML accepted by `mcomp merge`.

    merge_method: pcb
    base_model: path/to/base
    models:
      - model: path/to/finetuned-a
        parameters: {weight: 1.2}
      - model: path/to/lora-adapter-b     # peft adapter dirs are accepted too
    parameters: {ratio: 0.1, clip: 0.01, scale: 1.0}
    dtype: float16
    lora_rank: 16                         # optional: re-factorise merged adapters (mcomp extension)

`weight` is the only per-model parameter (λ_i); the method's other parameters go under the
top-level `parameters`. `lambda` is accepted as mergekit's name for `scale`. A model entry
equal to `base_model` is skipped (mergekit lists the base that way).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcomp.configuration import JsonConfig
from mcomp.resources import read_document

logger = logging.getLogger(__name__)


@dataclass
class ModelEntry(JsonConfig):
    model: str
    parameters: dict = field(default_factory=dict)


@dataclass
class MergeConfig(JsonConfig):
    merge_method: str
    base_model: str
    models: list = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    lora_rank: int | None = None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "MergeConfig":
        path = Path(path)
        return cls.from_mapping(read_document(path, "merge config", dict), str(path))

    @classmethod
    def from_mapping(cls, data: dict, source: str) -> "MergeConfig":
        """The config from its content (a YAML file's, or a recipe's `config`); errors name `source`."""
        path = source
        for key in ("merge_method", "base_model", "models"):
            if key not in data:
                raise ValueError(f"{path}: missing required field {key!r}")
        cfg = cls.from_dict(data, source=str(path))
        entries = []
        for i, item in enumerate(cfg.models):
            if isinstance(item, str):
                item = {"model": item}
            if not isinstance(item, dict):
                raise ValueError(f"{path}: models[{i}] must be a mapping with 'model'")
            entries.append(ModelEntry.from_dict(dict(item), source=f"{path}: models[{i}]"))
        cfg.models = entries
        return cfg

    def resolved_models(self) -> list[ModelEntry]:
        out = []
        for e in self.models:
            if os.path.normpath(e.model) == os.path.normpath(self.base_model):
                logger.info("skipping the base model listed among the models")
                continue
            unknown = sorted(set(e.parameters) - {"weight"})
            if unknown:
                raise ValueError(
                    f"model {e.model!r}: per-model parameter(s) {unknown} not supported "
                    "(only 'weight'; put the others under the top-level 'parameters')"
                )
            out.append(e)
        if not out:
            raise ValueError("no models to merge (the list is empty or holds only the base model)")
        return out

    def method_params(self) -> dict[str, Any]:
        params = dict(self.parameters)  # `lambda` passes through: the registry takes it as `scale`
        if "weight" in params or "weights" in params:
            raise ValueError("per-model weights go under each model's 'parameters: {weight: ...}'")
        models = self.resolved_models()
        if any("weight" in e.parameters for e in models):
            params["weights"] = [e.parameters.get("weight", 1.0) for e in models]
        return params

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    def with_absolute_paths(self) -> "MergeConfig":
        """The same config with the base and model paths that exist made absolute (a recipe's form)."""

        def absolute(path: str) -> str:
            return os.path.abspath(path) if os.path.exists(path) else path

        models = [ModelEntry(absolute(e.model), dict(e.parameters)) for e in self.models]
        return dataclasses.replace(self, base_model=absolute(self.base_model), models=models)
