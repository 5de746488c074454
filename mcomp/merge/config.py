"""The merge YAML accepted by `mcomp merge`: mergekit's schema (docs/merging_with_mergekit_yaml.md).

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/finetuned-a
        parameters: {weight: 1.0, density: [1, 0.7, 0.1]}     # gradients over the layers
      - model: path/to/finetuned-b+path/to/lora               # a LoRA applied to the model first
        parameters:
          weight: [{filter: mlp, value: 0.5}, {value: 0}]    # per tensor, by name
          density: 0.5
    parameters: {normalize: true, int8_mask: true}
    dtype: float16          # mergekit: the dtype the inputs are read in; out_dtype: the output's
    tokenizer_source: base  # or a model: its tokenizer (every model must share its vocabulary)

or `slices: [{sources: [{model, layer_range: [a, b], parameters}], base_model, parameters}]` instead of
`models` (mergekit's layer stacking; `passthrough` copies them).

Two readings (`mcomp.merge.mergekit_schema.reading`): a config in mergekit's vocabulary, for a method mergekit
has, is merged as mergekit merges it (per tensor, per-model densities, gradients, filters, slices:
`mcomp.merge.mergekit_plan`, `mcomp.merge.plan_merge`). A config naming mcomp's own parameters (`scope`,
`sign`, `seed`, `scale`, PCB's `ratio`, ...), mcomp's `lora_rank`, a peft adapter directory as a model, or a
method mergekit lacks (pcb, tsv, iso_c, ...) keeps mcomp's reading: the papers' released code, each model's
`weight` as its only per-model parameter, the method's others under the top-level `parameters` as plain values,
`lambda` accepted as mergekit's name for `scale`, `dtype` the output dtype; a model equal to `base_model`
is skipped.

`MergeConfig.to_dict()` is the normalised config: `MergeConfig.from_mapping(cfg.to_dict(), ...)` describes the
same merge (the recipe written next to a merge's output).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcomp.configuration import JsonConfig
from mcomp.merge.mergekit_schema import (
    MCOMP,
    MERGEKIT,
    REFUSED_KEYS,
    ModelRef,
    check_parameters,
    check_slices,
    reading,
)
from mcomp.resources import read_document

logger = logging.getLogger(__name__)

DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class ModelEntry(JsonConfig):
    model: str
    parameters: dict = field(default_factory=dict)


@dataclass
class MergeConfig(JsonConfig):
    merge_method: str
    base_model: str | None = None
    models: list | None = None
    slices: list | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    lora_rank: int | None = None
    source: str = field(default="config", repr=False, compare=False)  # where it was read from, for errors

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "MergeConfig":
        path = Path(path)
        return cls.from_mapping(read_document(path, "merge config", dict), str(path))

    @classmethod
    def from_mapping(cls, data: dict, source: str) -> "MergeConfig":
        """The config from its content (a YAML file's, or a recipe's `config`); errors name `source`."""
        data = {k: v for k, v in data.items() if v is not None}
        for key, why in REFUSED_KEYS.items():
            if key in data:
                raise ValueError(f"{source}: {key!r}: {why}")
        if "merge_method" not in data:
            raise ValueError(f"{source}: missing required field 'merge_method'")
        if ("models" in data) == ("slices" in data):
            raise ValueError(f"{source}: give exactly one of 'models' and 'slices'")
        if "source" in data:
            raise ValueError(f"{source}: unknown field(s) ['source'] for MergeConfig")
        cfg = cls.from_dict(data, source=source)
        cfg.source = source
        if not isinstance(cfg.merge_method, str):
            raise ValueError(f"{source}: merge_method must be a name, got {cfg.merge_method!r}")
        for key in ("dtype", "out_dtype"):
            if getattr(cfg, key) is not None and getattr(cfg, key) not in DTYPES:
                raise ValueError(f"{source}: {key} must be one of {list(DTYPES)}, got {getattr(cfg, key)!r}")
        if cfg.base_model is not None:
            ModelRef.parse(cfg.base_model, f"{source}: base_model")
        if cfg.models is not None:
            cfg.models = [cls._entry(item, f"{source}: models[{i}]") for i, item in enumerate(cfg.models)]
        else:
            cfg.slices = check_slices(cfg.slices, f"{source}: slices")
        if cfg.tokenizer_source is not None:
            if cfg.tokenizer_source == "union":
                raise ValueError(
                    f"{source}: tokenizer_source 'union' is not supported (it needs embedding rows for the union "
                    "vocabulary); use 'base' or a model whose vocabulary every model shares"
                )
            if cfg.tokenizer_source != "base":
                ModelRef.parse(cfg.tokenizer_source, f"{source}: tokenizer_source")
        if cfg.reading() == MCOMP:
            cfg._check_mcomp_reading()  # mcomp's parameters as its methods take them (e.g. KnOTS's base_params)
        else:
            cfg.parameters = check_parameters(cfg.parameters, f"{source}: parameters")
        return cfg

    @staticmethod
    def _entry(item: Any, where: str) -> ModelEntry:
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict) or "model" not in item:
            raise ValueError(f"{where}: must be a mapping with 'model'")
        entry = ModelEntry.from_dict(dict(item), source=where)
        ModelRef.parse(entry.model, f"{where}.model")
        entry.parameters = check_parameters(entry.parameters, f"{where}.parameters")
        return entry

    # -- which reading --------------------------------------------------------------------------
    def model_paths(self) -> list[str]:
        if self.models is not None:
            return [e.model for e in self.models]
        return [s["model"] for sl in self.slices for s in sl["sources"]]

    def reading(self) -> str:
        """MERGEKIT (mergekit's semantics) or MCOMP (mcomp's own), see `mcomp.merge.mergekit_schema`."""
        from mcomp.merge.registry import REGISTRY

        if self.lora_rank is not None:
            return MCOMP  # mcomp's own key: a re-factorised adapter out
        cls = REGISTRY.get(self.merge_method)
        names = {f.name for f in dataclasses.fields(cls.Params)} if cls is not None else None
        return reading(self.merge_method, self.parameters, names, self.model_paths())

    def _check_mcomp_reading(self) -> None:
        """What mcomp's reading cannot express is refused, naming the field."""
        where = self.source
        if self.base_model is None:
            raise ValueError(f"{where}: missing required field 'base_model' ({self._why_mcomp()})")
        for key in ("slices", "out_dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                raise ValueError(
                    f"{where}: {key!r} needs mergekit's reading, which {self.merge_method!r} with these parameters "
                    f"does not get ({self._why_mcomp()})"
                )
        from mcomp.merge.registry import REGISTRY

        cls = REGISTRY.get(self.merge_method)
        containers = (
            {  # the method's own structured parameters (e.g. KnOTS's base_params), not gradients
                f.name for f in dataclasses.fields(cls.Params) if f.default_factory is not dataclasses.MISSING
            }
            if cls is not None
            else set()
        )
        for name, value in self.parameters.items():
            if isinstance(value, (list, dict)) and name not in containers:
                raise ValueError(
                    f"{where}: parameters.{name}: gradients and filters need mergekit's reading ({self._why_mcomp()})"
                )
        for i, e in enumerate(self.models):
            if "+" in e.model:
                raise ValueError(
                    f"{where}: models[{i}].model: 'model+lora' needs mergekit's reading ({self._why_mcomp()})"
                )
            unknown = sorted(set(e.parameters) - {"weight"})
            if unknown:
                raise ValueError(
                    f"{where}: models[{i}].parameters: per-model parameter(s) {unknown} need mergekit's reading "
                    f"({self._why_mcomp()}); with mcomp's, only 'weight' is per model"
                )
            if isinstance(e.parameters.get("weight"), (list, dict)):
                raise ValueError(
                    f"{where}: models[{i}].parameters.weight: gradients and filters need mergekit's reading "
                    f"({self._why_mcomp()})"
                )

    def _why_mcomp(self) -> str:
        from mcomp.merge.mergekit_schema import METHODS, is_adapter_dir

        if self.merge_method not in METHODS:
            return f"mergekit has no method {self.merge_method!r}"
        if any(is_adapter_dir(p) for p in self.model_paths()):
            return "a model is a peft adapter directory"
        mine = sorted(set(self.parameters) - METHODS[self.merge_method].parameter_names())
        return f"mcomp's parameter(s) {mine} select mcomp's reading"

    # -- mcomp's reading ------------------------------------------------------------------------
    def resolved_models(self) -> list[ModelEntry]:
        """The models to merge under mcomp's reading (the base, if listed, skipped)."""
        if self.models is None:
            raise ValueError(f"{self.source}: slices need mergekit's reading")
        out = []
        for e in self.models:
            if self.base_model is not None and os.path.normpath(e.model) == os.path.normpath(self.base_model):
                logger.info("skipping the base model listed among the models")
                continue
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

    # -- the normalised form --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The normalised config (None fields left out): `from_mapping` of it gives the same merge."""
        d = dataclasses.asdict(self)
        d.pop("source")
        return {k: v for k, v in d.items() if v is not None}

    def with_absolute_paths(self) -> "MergeConfig":
        """The same config with the base and model paths that exist made absolute (a recipe's form)."""

        def absolute(text: str | None) -> str | None:
            if text is None or (text == "base" and not os.path.exists(text)):
                return text
            return str(ModelRef.parse(text, self.source).absolute())

        models = None
        if self.models is not None:
            models = [ModelEntry(absolute(e.model), dict(e.parameters)) for e in self.models]
        slices = None
        if self.slices is not None:
            slices = [
                {
                    **sl,
                    "sources": [{**s, "model": absolute(s["model"])} for s in sl["sources"]],
                    **({"base_model": absolute(sl["base_model"])} if "base_model" in sl else {}),
                }
                for sl in self.slices
            ]
        return dataclasses.replace(
            self,
            base_model=absolute(self.base_model),
            models=models,
            slices=slices,
            tokenizer_source=absolute(self.tokenizer_source),
        )


__all__ = ["MERGEKIT", "MCOMP", "MergeConfig", "ModelEntry"]
