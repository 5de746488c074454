"""A mergekit config as a plan: every output tensor with its input tensors (model, name), its base and its
own parameters, built as mergekit's planner builds it (`mergekit/plan.py`).

* `models:` is one slice of every model's whole layer range; the base model is added as an input when it is
  not listed (as mergekit does).
* `slices:` lay their layers end to end: output layer k of the merged model comes from layer
  `layer_range[0] + offset` of each source, the output renumbered from 0. Tensors outside the layers come
  from the first slice's models (those with `embed` in their name: mergekit's pre-weights, the embeddings)
  or from the last slice's (the final norm and `lm_head`).
* Layers are found by name (`...layers.<i>.<rest>`), their count from `num_hidden_layers` in each model's
  `config.json`. A tensor absent from every input is skipped (mergekit's optional `lm_head`); absent from some
  is an error.
* Gradients run over each slice: t = offset / (L − 1) for a slice of L layers (1 for one layer), 0 outside
  the layers. Shared parameters are resolved against the output tensor's name, per-model ones against that
  model's input tensor name (`mcomp.merge.tensor_parameters`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcomp.merge.mergekit_schema import METHODS, MethodSpec, ModelRef
from mcomp.merge.tensor_parameters import filters_of, resolve

LAYER_NAME = re.compile(r"^(?P<head>(?:.*\.)?layers)\.(?P<index>\d+)\.(?P<tail>.+)$")


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its inputs (model, input tensor name) in source order, which input is the base
    (None: no base), and its resolved mergekit parameters (shared by name; per model as lists in input order)."""

    name: str
    inputs: tuple[tuple[ModelRef, str], ...]
    base: int | None
    shared: dict[str, Any]
    per_input: dict[str, list[Any]]


@dataclass
class MergePlan:
    method: str
    tensors: list[PlannedTensor]
    donor: ModelRef  # whose config.json and tokenizer files the output takes
    num_layers: int | None  # the output's layer count when the config uses slices


@dataclass(frozen=True)
class ModelLayout:
    """A model's tensor names (storage order) and layers, read from its files without loading a weight."""

    names: tuple[str, ...]
    num_layers: int
    head: str | None  # the name before the layer index, e.g. "model.layers"

    @classmethod
    def read(cls, ref: ModelRef, tensor_names: Callable[[str], list[str]]) -> "ModelLayout":
        names = tuple(tensor_names(ref.model))
        indices, heads = set(), set()
        for n in names:
            m = LAYER_NAME.match(n)
            if m:
                indices.add(int(m["index"]))
                heads.add(m["head"])
        if len(heads) > 1:
            raise ValueError(f"model {ref.model!r}: layers under several names {sorted(heads)}")
        config = Path(ref.model) / "config.json"
        count = max(indices) + 1 if indices else 0
        if config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            data = data.get("text_config", data) if "num_hidden_layers" not in data else data
            if "num_hidden_layers" in data:
                count = int(data["num_hidden_layers"])
        if indices and max(indices) >= count:
            raise ValueError(f"model {ref.model!r}: layer {max(indices)} found but config.json says {count} layers")
        return cls(names, count, next(iter(heads)) if heads else None)

    def layer_tails(self, index: int) -> list[str]:
        out = []
        for n in self.names:
            m = LAYER_NAME.match(n)
            if m and int(m["index"]) == index:
                out.append(m["tail"])
        return out

    def non_layer(self) -> list[str]:
        return [n for n in self.names if not LAYER_NAME.match(n)]


def normalised_slices(cfg: Any, layouts: Callable[[ModelRef], ModelLayout], where: str) -> list[dict]:
    """The config's slices, `models:` turned into one slice as mergekit's `normalize_config` does; sources as
    (ModelRef, layer_range, parameters)."""
    if cfg.slices:
        return [
            {
                "sources": [
                    (ModelRef.parse(s["model"], where), tuple(s["layer_range"]), s.get("parameters") or {})
                    for s in sl["sources"]
                ],
                "base": ModelRef.parse(sl["base_model"], where) if sl.get("base_model") else None,
                "parameters": sl.get("parameters") or {},
                "where": f"{where}: slices[{i}]",
            }
            for i, sl in enumerate(cfg.slices)
        ]
    base = ModelRef.parse(cfg.base_model, f"{where}: base_model") if cfg.base_model else None
    sources = []
    for i, e in enumerate(cfg.models):
        ref = ModelRef.parse(e.model, f"{where}: models[{i}].model")
        sources.append((ref, (0, layouts(ref).num_layers), e.parameters or {}))
    if base is not None and not any(ref.same_as(base) for ref, _, _ in sources):
        sources.append((base, (0, layouts(base).num_layers), {}))  # mergekit adds the base as an input
    return [{"sources": sources, "base": None, "parameters": {}, "where": f"{where}: models"}]


class Planner:
    """Builds the `MergePlan` of a `MergeConfig` read as mergekit reads it."""

    def __init__(self, cfg: Any, source: str, tensor_names: Callable[[str], list[str]]):
        self.cfg = cfg
        self.source = source
        self.spec: MethodSpec = METHODS[cfg.merge_method]
        self._layouts: dict[ModelRef, ModelLayout] = {}
        self._tensor_names = tensor_names
        self.top_base = ModelRef.parse(cfg.base_model, f"{source}: base_model") if cfg.base_model else None
        self.seen_names: set[str] = set()

    def check_parameter_names(self) -> None:
        """Every parameter named anywhere must be one of the method's (mergekit ignores others; mcomp refuses)."""
        known = self.spec.parameter_names()
        for settings, where in self._scopes():
            unknown = sorted(set(settings) - known)
            if unknown:
                raise ValueError(
                    f"{where}: merge method {self.cfg.merge_method!r} (mergekit's reading) has no parameter(s) "
                    f"{unknown}; its parameters: {sorted(known)}"
                )

    def _scopes(self) -> list[tuple[dict, str]]:
        scopes = [(self.cfg.parameters or {}, f"{self.source}: parameters")]
        if self.cfg.slices:
            for i, sl in enumerate(self.cfg.slices):
                scopes.append((sl.get("parameters") or {}, f"{self.source}: slices[{i}].parameters"))
                for j, s in enumerate(sl["sources"]):
                    scopes.append((s.get("parameters") or {}, f"{self.source}: slices[{i}].sources[{j}].parameters"))
        else:
            scopes += [
                (e.parameters or {}, f"{self.source}: models[{i}].parameters") for i, e in enumerate(self.cfg.models)
            ]
        return scopes

    def layout(self, ref: ModelRef) -> ModelLayout:
        if ref not in self._layouts:
            self._layouts[ref] = ModelLayout.read(ref, self._tensor_names)
        return self._layouts[ref]

    def plan(self) -> MergePlan:
        self.check_parameter_names()
        slices = normalised_slices(self.cfg, self.layout, self.source)
        for sl in slices:
            self._check_slice(sl)
        tensors: list[PlannedTensor] = []
        first, last = slices[0], slices[-1]
        outside = self.layout(first["sources"][0][0]).non_layer()
        for name in [n for n in outside if "embed" in n]:
            self._add(tensors, name, first, [(ref, name) for ref, _, _ in first["sources"]], 0.0)
        layer = 0
        head = None
        for sl in slices:
            count = sl["sources"][0][1][1] - sl["sources"][0][1][0]
            for offset in range(count):
                t = offset / (count - 1) if count > 1 else 1.0
                first_ref, (start, _), _ = sl["sources"][0]
                lay = self.layout(first_ref)
                head = head or lay.head
                for tail in lay.layer_tails(start + offset):
                    inputs = [
                        (ref, f"{self.layout(ref).head}.{rng[0] + offset}.{tail}") for ref, rng, _ in sl["sources"]
                    ]
                    self._add(tensors, f"{head}.{layer}.{tail}", sl, inputs, t)
                layer += 1
        for name in [n for n in outside if "embed" not in n]:
            self._add(tensors, name, last, [(ref, name) for ref, _, _ in last["sources"]], 0.0)
        self._check_filters()
        donor = self.top_base or first["sources"][0][0]
        return MergePlan(self.cfg.merge_method, tensors, donor, layer if self.cfg.slices else None)

    def _check_slice(self, sl: dict) -> None:
        where = sl["where"]
        for ref, (start, stop), _ in sl["sources"]:
            total = self.layout(ref).num_layers
            whole = not self.cfg.slices and start == stop == total == 0  # `models:` of checkpoints without layers
            if not (0 <= start < stop <= total or whole):
                raise ValueError(
                    f"{where}: layer_range [{start}, {stop}] of {str(ref)!r} is out of bounds (it has {total} layers)"
                )
        refs = [ref for ref, _, _ in sl["sources"]]
        if len({(r.model, r.lora) for r in refs}) != len(refs):
            raise ValueError(f"{where}: a model appears twice among the inputs")
        base = self.slice_base(sl)
        has_base = base is not None and any(r.same_as(base) for r in refs)
        if self.spec.base == "required" and not has_base:
            which = "no base_model given" if base is None else f"base {str(base)!r} is not among the inputs"
            raise ValueError(f"{where}: merge method {self.cfg.merge_method!r} needs a base model ({which})")
        if len(refs) < self.spec.min_inputs or (self.spec.max_inputs is not None and len(refs) > self.spec.max_inputs):
            bound = self.spec.max_inputs if self.spec.max_inputs == self.spec.min_inputs else None
            want = (
                f"exactly {bound}"
                if bound
                else f"at least {self.spec.min_inputs}"
                + (f" and at most {self.spec.max_inputs}" if self.spec.max_inputs else "")
            )
            raise ValueError(
                f"{where}: merge method {self.cfg.merge_method!r} takes {want} input model(s) (the base "
                f"included), got {len(refs)}"
            )

    def slice_base(self, sl: dict) -> ModelRef | None:
        return sl["base"] or self.top_base

    def _add(self, tensors: list, name: str, sl: dict, inputs: list[tuple[ModelRef, str]], t: float) -> None:
        present = [in_name in self.layout(ref).names for ref, in_name in inputs]
        if not any(present):
            return  # mergekit's optional weights (lm_head of a model with tied embeddings)
        if not all(present):
            missing = [str(ref) for (ref, _), p in zip(inputs, present) if not p]
            raise ValueError(f"tensor {name!r}: missing from model(s) {missing}")
        self.seen_names.update([name, *(n for _, n in inputs)])
        base = self.slice_base(sl) if self.spec.base == "required" else None
        base_index = next((i for i, (ref, _) in enumerate(inputs) if ref.same_as(base)), None)
        top = (self.cfg.parameters, f"{self.source}: parameters")
        shared_scopes = [(sl["parameters"], f"{sl['where']}.parameters"), top]
        shared = {k.name: resolve(k, shared_scopes, name, t, "the merge") for k in self.spec.shared}
        per_input: dict[str, list[Any]] = {}
        for i, (ref, in_name) in enumerate(inputs):
            own = [
                (p, f"{sl['where']}.sources[{j}].parameters") for j, (r, _, p) in enumerate(sl["sources"]) if r == ref
            ]
            scopes = [*own, *shared_scopes]
            kinds = [*self.spec.per_input, *(self.spec.per_model if i != base_index else ())]
            for k in kinds:
                per_input.setdefault(k.name, [None] * len(inputs))[i] = resolve(
                    k, scopes, in_name, t, f"model {str(ref)!r}"
                )
        tensors.append(PlannedTensor(name, tuple(inputs), base_index, shared, per_input))

    def _check_filters(self) -> None:
        for settings, where in self._scopes():
            for pname, setting in settings.items():
                for pattern in filters_of(setting):
                    if not any(pattern in n for n in self.seen_names):
                        raise ValueError(f"{where}.{pname}: filter {pattern!r} matches no tensor of the merge")
