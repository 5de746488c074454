"""mergekit's merge YAML: its methods' parameters, model references (`model+lora`), slices, and which reading
(mergekit's or mcomp's) a config gets.

mergekit 0.1.5's methods that mcomp has, with their parameters (`mergekit/merge_methods/`):

| method | shared | per model |
|---|---|---|
| task_arithmetic, ties, dare_ties, dare_linear | int8_mask, normalize, rescale, lambda | weight (required), density |
| breadcrumbs, breadcrumbs_ties | the same | weight, density, gamma |
| della, della_linear | the same | weight, density, epsilon |
| linear | normalize | weight (required; the base too, when listed) |
| slerp | t (required) | – |
| model_stock | filter_wise | – |
| passthrough | – | scale |

A config is read as mergekit reads it (`MERGEKIT`) unless it names one of mcomp's own parameters that
mergekit's method lacks (`scope`, `sign`, `seed`, `scale`, `weights`, a string `rescale`, PCB's `ratio`...),
uses mcomp's `lora_rank`, lists a peft adapter directory as a model, or the method is one mergekit lacks: then
it is mcomp's reading (`MCOMP`), the papers' released code (e.g. TIES over all tensors at once).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcomp.merge.tensor_parameters import REQUIRED, ParameterKind, check_setting

MERGEKIT, MCOMP = "mergekit", "mcomp"

# keys of mergekit's schema that mcomp refuses, and why
REFUSED_KEYS = {
    "modules": "per-module merges (multimodal architectures) are not supported; use models or slices",
    "tokenizer": "the `tokenizer:` block (added tokens, padding) is not supported; tokenizer_source base or a "
    "model with the same vocabulary is",
    "chat_template": "chat_template is not supported; the output keeps the tokenizer files of its donor model",
}


@dataclass(frozen=True)
class MethodSpec:
    """A mergekit method: its parameters and input contract (`mergekit.merge_methods.base.InputContract`)."""

    shared: tuple[ParameterKind, ...] = ()
    per_input: tuple[ParameterKind, ...] = ()  # every input's, the base's too (mergekit scope INPUT)
    per_model: tuple[ParameterKind, ...] = ()  # the non-base inputs' (mergekit scope NON_BASE)
    base: str = "ignored"  # "required" | "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    extra: dict = field(default_factory=dict)

    def parameter_names(self) -> set[str]:
        return {k.name for k in (*self.shared, *self.per_input, *self.per_model)}


def _gta_spec(normalize: bool, rescale: bool, extra: tuple[ParameterKind, ...] = ()) -> MethodSpec:
    return MethodSpec(
        shared=(
            ParameterKind("int8_mask", "bool", False),
            ParameterKind("normalize", "bool", normalize),
            ParameterKind("rescale", "bool", rescale),
            ParameterKind("lambda", "float", 1.0),
        ),
        per_model=(ParameterKind("weight", "float"), ParameterKind("density", "float", 1.0), *extra),
        base="required",
    )


GAMMA = (ParameterKind("gamma", "float", 0.01),)
EPSILON = (ParameterKind("epsilon", "float", 0.15),)
METHODS: dict[str, MethodSpec] = {
    "task_arithmetic": _gta_spec(False, False),
    "ties": _gta_spec(True, False),
    "dare_ties": _gta_spec(False, True),
    "dare_linear": _gta_spec(False, True),
    "breadcrumbs": _gta_spec(False, False, GAMMA),
    "breadcrumbs_ties": _gta_spec(False, False, GAMMA),
    "della": _gta_spec(True, True, EPSILON),
    "della_linear": _gta_spec(False, True, EPSILON),
    "linear": MethodSpec(
        shared=(ParameterKind("normalize", "bool", True),), per_input=(ParameterKind("weight", "float"),)
    ),
    "slerp": MethodSpec(shared=(ParameterKind("t", "float"),), base="required", min_inputs=2, max_inputs=2),
    "model_stock": MethodSpec(shared=(ParameterKind("filter_wise", "bool", False),), base="required", min_inputs=3),
    "passthrough": MethodSpec(per_input=(ParameterKind("scale", "optional_float", None),), max_inputs=1),
}
# mergekit methods mcomp does not have (the parity table lists them as such)
NOT_IN_MCOMP = (
    "arcee_fusion",
    "karcher",
    "multislerp",
    "nearswap",
    "nuslerp",
    "ram",
    "ramplus_tl",
    "sce",
)


@dataclass(frozen=True)
class ModelRef:
    """mergekit's model reference: a model directory, optionally `+` a peft LoRA adapter applied to it first."""

    model: str
    lora: str | None = None

    @classmethod
    def parse(cls, text: Any, where: str) -> "ModelRef":
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}: a model must be a path (optionally 'model+lora'), got {text!r}")
        if "@" in text:
            raise ValueError(f"{where}: {text!r}: revisions ('@') name Hugging Face Hub models; give local paths")
        parts = text.split("+")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"{where}: {text!r} is neither 'model' nor 'model+lora'")
        return cls(parts[0], parts[1] if len(parts) == 2 else None)

    def __str__(self) -> str:
        return self.model if self.lora is None else f"{self.model}+{self.lora}"

    def same_as(self, other: "ModelRef | None") -> bool:
        """mergekit compares references as written; paths are compared normalised here."""
        return other is not None and _norm(self.model) == _norm(other.model) and _norm(self.lora) == _norm(other.lora)

    def absolute(self) -> "ModelRef":
        def absolute(path: str | None) -> str | None:
            return os.path.abspath(path) if path is not None and os.path.exists(path) else path

        return ModelRef(absolute(self.model), absolute(self.lora))


def _norm(path: str | None) -> str | None:
    return None if path is None else os.path.normpath(path)


def check_parameters(params: Any, where: str) -> dict:
    """A `parameters` mapping whose values are settings mergekit reads (scalars, gradients, conditionals)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: 'parameters' must be a mapping, got {params!r}")
    for name, setting in params.items():
        check_setting(setting, f"{where}.{name}")
    return params


def check_slices(slices: Any, where: str) -> list[dict]:
    """mergekit's `slices`: [{sources: [{model, layer_range: [a, b], parameters}], base_model, parameters}]."""
    if not isinstance(slices, list) or not slices:
        raise ValueError(f"{where}: 'slices' must be a non-empty list")
    out = []
    for i, item in enumerate(slices):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{here}: a slice must be a mapping with 'sources'")
        if item.get("residual_weight") is not None:
            raise ValueError(f"{here}.residual_weight: not supported (mergekit does not apply it either)")
        unknown = sorted(set(item) - {"sources", "base_model", "parameters", "residual_weight"})
        if unknown:
            raise ValueError(f"{here}: unknown key(s) {unknown}; a slice takes sources, base_model, parameters")
        sources = item.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ValueError(f"{here}.sources: must be a non-empty list")
        checked = []
        for j, src in enumerate(sources):
            at = f"{here}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise ValueError(f"{at}: a source needs 'model' and 'layer_range'")
            extra = sorted(set(src) - {"model", "layer_range", "parameters"})
            if extra:
                raise ValueError(f"{at}: unknown key(s) {extra}; a source takes model, layer_range, parameters")
            ModelRef.parse(src["model"], f"{at}.model")
            rng = src["layer_range"]
            if (
                not isinstance(rng, (list, tuple))
                or len(rng) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
            ):
                raise ValueError(f"{at}.layer_range: must be two integers [start, stop), got {rng!r}")
            checked.append(
                {
                    "model": src["model"],
                    "layer_range": list(rng),
                    "parameters": check_parameters(src.get("parameters"), f"{at}.parameters"),
                }
            )
        lengths = {s["layer_range"][1] - s["layer_range"][0] for s in checked}
        if len(lengths) != 1:
            raise ValueError(
                f"{here}: every source of a slice must span the same number of layers, got {sorted(lengths)}"
            )
        entry = {"sources": checked, "parameters": check_parameters(item.get("parameters"), f"{here}.parameters")}
        if item.get("base_model") is not None:
            ModelRef.parse(item["base_model"], f"{here}.base_model")
            entry["base_model"] = item["base_model"]
        out.append(entry)
    return out


def is_adapter_dir(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def reading(method: str, parameters: dict, mcomp_param_names: set[str] | None, model_paths: list[str]) -> str:
    """MERGEKIT or MCOMP: see the module docstring. `mcomp_param_names`: mcomp's method's parameters (None when
    mcomp lacks the method)."""
    if method not in METHODS:
        return MCOMP
    spec_names = METHODS[method].parameter_names()
    for name, value in parameters.items():
        if name == "rescale" and isinstance(value, str):
            return MCOMP  # mcomp's DARE: 'inverse' | 'l1'; mergekit's is true/false
        if name not in spec_names and mcomp_param_names is not None and name in mcomp_param_names:
            return MCOMP
    if any(is_adapter_dir(p) for p in model_paths):
        return MCOMP
    return MERGEKIT


__all__ = ["METHODS", "MCOMP", "MERGEKIT", "NOT_IN_MCOMP", "REFUSED_KEYS", "REQUIRED", "MethodSpec", "ModelRef"]
