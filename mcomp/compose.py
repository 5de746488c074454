"""Compose single-modality MLLMs that share a base LLM into one MLLM (NaiveMC, DAMC).

Every input keeps its encoder, projector and (DAMC) prefix/suffix tokens. What differs is the
LLM side:

- NaiveMC: all tokens go through the merged text LoRA. A linear merge stays exact and
  unmaterialised (routes of coefficient-weighted adapters, `mcomp.lora`); TIES/DARE/PCB merge
  the dense deltas dW_m = s_m B_m A_m with the merge engine and fold the result into the base
  weights (or re-factorise it to a LoRA of `lora_rank`).
- DAMC: only the text adapters are merged (same choices); each modality's tokens keep that
  model's own modality adapter (coefficient 1) and its prefix/suffix tokens.

Semantics follow the published composition (spec: modelcompose.md §3), with the merge of LoRA
adapters done on dW, never on A and B separately (spec: merging.md, "LoRA adapters").
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mcomp.checkpoint import (
    CONFIG_NAME,
    MLLMConfig,
    base_weights_sha256,
    inside_paths,
    load_adapter_weights,
    load_modality_tokens,
    read_config,
    resolve_base,
    tokenizer_sha256,
)
from mcomp.io import sha256_file
from mcomp.lora import TEXT_ROUTE, LoraSpec, fold_into_base, routed_layers
from mcomp.merge import merge_task_vectors
from mcomp.merge.lora import refactorise
from mcomp.merge.registry import get_method
from mcomp.merge.sources import LowRank
from mcomp.modality import get_adapter_class
from mcomp.tokenization import convention_difference, vocabulary_difference

logger = logging.getLogger(__name__)

METHODS = ("naivemc", "damc")
LINEAR = "linear"
MERGE_SPACES = ("delta", "factors")  # what the text adapters' merge acts on (`compose`)


@dataclasses.dataclass
class ComposeInput:
    modality: str
    path: Path
    config: MLLMConfig
    adapter: dict  # the config of the model's adapter of `modality`

    @property
    def lora_adapters(self) -> list[str]:
        return list(self.config.lora["adapters"]) if self.config.lora else []

    @property
    def decoupled(self) -> bool:
        return self.modality in self.lora_adapters


def read_inputs(models: Mapping[str, str | os.PathLike]) -> list[ComposeInput]:
    """Check each `modality -> directory` pair and that all inputs share one base and tokenizer. A model
    of several modalities (LLaVA-OneVision: image and video) gives the adapter of the modality named;
    it may be named for each of them (`model_groups`)."""
    if not models:
        raise ValueError("no models to compose")
    inputs, seen = [], {}
    for key, path in models.items():
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory for {key!r} not found: {path}")
        cfg = read_config(path)
        adapters = {}
        for adapter in cfg.adapters:
            adapter = inside_paths(adapter, path)  # its files, wherever the composition is saved
            cls = get_adapter_class(adapter["adapter"])
            adapters.update({name: (cls.modality, adapter) for name in (cls.modality, *cls.aliases)})
        if key not in adapters:
            held = sorted({m for m, _ in adapters.values()})
            what = f"a {held[0]!r} model" if len(held) == 1 else f"a model of {held}"
            raise ValueError(f"--models {key}={path}: that directory holds {what}, not {key!r}")
        modality, adapter = adapters[key]
        if modality in seen:
            raise ValueError(f"modality {modality!r} given twice: {seen[modality]} and {path}")
        seen[modality] = path
        inputs.append(ComposeInput(modality, path, cfg, adapter))
    first = inputs[0]
    tok = tokenizer_sha256(first.path)
    for other in inputs[1:]:
        if other.config.base_model_config != first.config.base_model_config:
            raise ValueError(
                f"{other.path} and {first.path} have different base LLMs: "
                f"{other.config.base_model_config} vs {first.config.base_model_config}"
            )
        if other.config.base_model_sha256 != first.config.base_model_sha256:
            raise ValueError(
                f"{other.path} and {first.path} were trained on different base weights "
                f"(base_model_sha256 {other.config.base_model_sha256[:12]} vs {first.config.base_model_sha256[:12]})"
            )
        if tokenizer_sha256(other.path) != tok:
            a, b = _tokenizer(first.path), _tokenizer(other.path)
            differ = vocabulary_difference(a, b)
            if differ:
                raise ValueError(f"{other.path} and {first.path} use different tokenizers ({differ})")
            convention = convention_difference(a, b)
            if convention:  # one vocabulary, another convention: the composed model uses the first's
                logger.warning(
                    "%s and %s share a vocabulary but tokenise differently (%s); the composed model uses the "
                    "tokenizer of %s",
                    other.path,
                    first.path,
                    convention,
                    first.path,
                )
    return inputs


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def model_groups(inputs: list[ComposeInput]) -> list[list[ComposeInput]]:
    """The inputs by model directory, in order: a model named for several modalities is one model."""
    groups: dict[Path, list[ComposeInput]] = {}
    for inp in inputs:
        groups.setdefault(inp.path.resolve(), []).append(inp)
    return list(groups.values())


def coefficients(inputs: list[ComposeInput], weights: Mapping[str, float] | None, merge: str) -> dict[str, float]:
    """Default: the average (1/n over the n models) for sums (linear, dare_linear); 1 for TIES and PCB,
    which already take a (disjoint or weighted) mean of the task vectors. With `weights`, a modality they
    do not name keeps λ = 1, as in the published `online-merge-reset-default-m=λ` (spec: modelcompose.md
    §3.4)."""
    names = [i.modality for i in inputs]
    if weights is None:
        default = 1.0 / len(model_groups(inputs)) if merge in (LINEAR, "dare_linear") else 1.0
        return {m: default for m in names}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"weights given for {unknown}, which are not composed modalities ({names})")
    return {m: float(weights.get(m, 1.0)) for m in names}


def compose(
    models: Mapping[str, str | os.PathLike],
    method: str = "naivemc",
    merge: str = LINEAR,
    weights: Mapping[str, float] | None = None,
    merge_params: Mapping[str, Any] | None = None,
    convert: bool = False,
    lora_rank: int | None = None,
    seed: int = 0,
    merge_space: str = "delta",
):
    """Build the composed MultimodalLM from single-modality model directories. `seed` seeds the
    merge method's random steps (DARE's drop masks) unless `merge_params` sets its own.

    `merge_space`: "delta" merges the text adapters' dW = s B A (exact for linear); "factors" merges
    their A and B factors apart as the released merge script does for its `ties-*`, `sum` and `mean`
    strategies (e.g. --merge ties: TIES over the flattened factors; linear with weights 1 or 1/n:
    `sum` or `mean`, cross terms B_i A_j included), and the merged factors form the text LoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcomp.model import MultimodalLM
    from mcomp.peft_format import load_adapter_into

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if merge_space not in MERGE_SPACES:
        raise ValueError(f"merge_space must be one of {MERGE_SPACES}, got {merge_space!r}")
    if merge_space == "factors" and lora_rank is not None:
        raise ValueError("merge_space='factors' keeps the inputs' LoRA rank; lora_rank re-factorises a dense delta")
    inputs = read_inputs(models)
    shared = [g for g in model_groups(inputs) if len(g) > 1]
    if shared:
        raise ValueError(
            f"{shared[0][0].path} is named for {[i.modality for i in shared[0]]}: a model of several modalities "
            "composes on disk (mcomp.compose_checkpoint, which the CLI uses for full fine-tunes)"
        )
    coef = coefficients(inputs, weights, merge)
    for inp in inputs:
        if inp.config.llm:
            raise ValueError(
                f"{inp.path}: its LLM is a full fine-tune, which is composed on disk, tensor by tensor: "
                "mcomp.compose_checkpoint.compose_checkpoint (mcomp compose does so by itself)"
            )
        if TEXT_ROUTE not in inp.lora_adapters:
            raise ValueError(f"{inp.path}: has no text LoRA to merge (a stage-1 model? train stage 2 first)")
        if method == "damc" and not inp.decoupled and not convert:
            raise ValueError(
                f"{inp.path}: DAMC needs a model trained with --decoupled; pass convert=True "
                f"(--convert) to use its single LoRA for both its modality and text tokens"
            )
        if method == "naivemc" and inp.decoupled:
            logger.warning("%s was trained decoupled; NaiveMC uses only its text LoRA", inp.path)

    first = inputs[0]
    base = resolve_base(first.path, first.config)
    llm = AutoModelForCausalLM.from_pretrained(str(base), trust_remote_code=False)
    if base_weights_sha256(llm) != first.config.base_model_sha256:
        raise ValueError(f"{base}: base weights do not match base_model_sha256 of {first.path}/{CONFIG_NAME}")
    tokenizer = AutoTokenizer.from_pretrained(str(first.path), trust_remote_code=False)
    model = MultimodalLM.build(llm, tokenizer, [i.adapter for i in inputs], template=first.config.template)
    for inp in inputs:
        load_adapter_weights(model, inp.modality, inp.path)
        load_adapter_into(model, inp.path / "lora" / TEXT_ROUTE, f"text-{inp.modality}")
        if method == "damc":
            source = inp.modality if inp.decoupled else TEXT_ROUTE  # convert: the one LoRA serves both
            load_adapter_into(model, inp.path / "lora" / source, inp.modality)
        load_modality_tokens(model, inp.path, only=inp.modality)

    text_terms = [(f"text-{m}", c) for m, c in coef.items()]
    report: dict[str, Any] = {}
    if merge_space == "factors":
        report["merge_space"] = "factors"
        params = merge_parameters(merge, merge_params, seed, report)
        merge_text_factors(model, inputs, merge, coef, params, "text-merged")
        routes = {TEXT_ROUTE: [("text-merged", 1.0)]}
    elif merge == LINEAR:
        routes = {TEXT_ROUTE: text_terms}
    else:
        params = merge_parameters(merge, merge_params, seed, report)
        merged = merge_text_deltas(model, inputs, merge, coef, params)
        for inp in inputs:
            _remove_adapter(model, f"text-{inp.modality}")
        if method == "naivemc" and lora_rank is None:
            fold_deltas(model, merged, origin=", ".join(str(i.path) for i in inputs))
            routes = {}
            report["folded_into_base"] = True
        else:
            rank = lora_rank or sum(i.config.lora["spec"]["r"] for i in inputs)
            report["lora_rank"] = rank
            report["reconstruction_error"] = add_refactorised(model, merged, "text-merged", rank)
            routes = {TEXT_ROUTE: [("text-merged", 1.0)]}
    if method == "damc":
        routes.update({i.modality: [(i.modality, 1.0)] for i in inputs})
    if routes:
        model.set_routes(routes)
    elif model.lora_spec is not None and not model.lora_adapters:
        model.lora_spec = None
    model.provenance = {
        "composition": {
            "method": method,
            "merge": merge,
            "weights": coef,
            "merge_params": dict(merge_params or {}),
            "convert": convert,
            **report,
            "inputs": [
                {
                    "modality": i.modality,
                    "path": str(i.path.resolve()),
                    "config_sha256": sha256_file(i.path / CONFIG_NAME),
                    "base_model_sha256": i.config.base_model_sha256,
                }
                for i in inputs
            ],
        }
    }
    return model.eval()


def _remove_adapter(model, name: str) -> None:
    for layer in routed_layers(model.llm).values():
        layer.remove_adapter(name)


def merge_text_deltas(model, inputs, merge: str, coef: dict[str, float], params: dict) -> dict[str, torch.Tensor]:
    """Merge the text deltas dW_m = s_m B_m A_m of every routed layer with the merge engine: dense, or as
    their factors to a method that takes them (KnOTS)."""
    layers = routed_layers(model.llm)
    if get_method(merge).takes_factors:
        deltas = [
            {
                path: LowRank(
                    layer.lora_B[f"text-{i.modality}"].detach().float() * layer.scaling[f"text-{i.modality}"],
                    layer.lora_A[f"text-{i.modality}"].detach().float(),
                )
                for path, layer in layers.items()
            }
            for i in inputs
        ]
    else:
        deltas = [
            {path: layer.delta_weight([(f"text-{i.modality}", 1.0)]) for path, layer in layers.items()} for i in inputs
        ]
    set_weights(params, [coef[i.modality] for i in inputs])
    return merge_task_vectors(deltas, merge, **params)


def set_weights(params: dict, weights: list[float]) -> None:
    """The per-model coefficients as the method's `weights`, unless given; all 1 is every method's default,
    left unsaid so that methods without per-model weights (model_stock) compose too."""
    if any(w != 1.0 for w in weights):
        params.setdefault("weights", weights)


def merge_parameters(merge: str, merge_params: Mapping[str, Any] | None, seed: int, report: dict) -> dict:
    """The merge method's parameters, its seed (if it takes one) from `seed` unless given; the seed
    used goes into `report`."""
    params = dict(merge_params or {})
    if "seed" in {f.name for f in dataclasses.fields(get_method(merge).Params)}:
        params.setdefault("seed", seed)
        report["seed"] = params["seed"]
    return params


def merge_text_factors(model, inputs, merge: str, coef: dict[str, float], params: dict, name: str) -> None:
    """Merge the text adapters' A and B factors as task vectors of their own (their init is not
    subtracted, as in the released merge script) and put the result in place of them as LoRA `name`
    (the inputs' rank and scaling, which must agree)."""
    layers = routed_layers(model.llm)
    adapters = [f"text-{i.modality}" for i in inputs]
    first = next(iter(layers.values()))
    shapes = {(first.lora_A[a].shape[0], first.scaling[a]) for a in adapters}
    if len(shapes) != 1:
        raise ValueError(
            f"merging LoRA factors needs one rank and scaling in every input, got (rank, scaling) "
            f"{sorted(shapes)} for {', '.join(str(i.path) for i in inputs)}"
        )
    ((rank, scaling),) = shapes
    factors = [
        {
            f"{path}.{kind}": getattr(layer, kind)[a].detach().float()
            for path, layer in layers.items()
            for kind in ("lora_A", "lora_B")
        }
        for a in adapters
    ]
    set_weights(params, [coef[i.modality] for i in inputs])
    merged = merge_task_vectors(factors, "task_arithmetic" if merge == LINEAR else merge, **params)
    for adapter in adapters:
        _remove_adapter(model, adapter)
    model.add_lora(dataclasses.replace(model.lora_spec, r=rank, alpha=rank * scaling, dropout=0.0), name=name)
    with torch.no_grad():
        for path, layer in layers.items():
            for kind in ("lora_A", "lora_B"):
                getattr(layer, kind)[name].copy_(merged[f"{path}.{kind}"])


def fold_deltas(model, merged: dict[str, torch.Tensor], origin: str = "") -> None:
    """Add merged deltas into the base weights (`mcomp.lora.fold_into_base`). The base changes, so it
    will be saved with the model."""
    fold_into_base(model.llm, merged, origin)
    model.llm.name_or_path = ""  # no longer the referenced base directory
    model.llm.config._name_or_path = ""


def add_refactorised(model, merged: dict[str, torch.Tensor], name: str, rank: int) -> float:
    """Each merged delta as a LoRA `name` of rank `rank` (scaling 1) by truncated SVD
    (`mcomp.merge.lora.refactorise`); returns the relative Frobenius reconstruction error over all layers."""
    spec = LoraSpec(r=rank, alpha=float(rank), target_modules=model.lora_spec.target_modules)
    model.add_lora(spec, name=name)
    err2, norm2 = 0.0, 0.0
    layers = routed_layers(model.llm)
    with torch.no_grad():
        for path, delta in merged.items():
            delta = delta.float()
            a, b, err = refactorise(delta, rank)
            layer = layers[path]
            layer.lora_A[name].zero_()[: a.shape[0]].copy_(a)  # a delta of lower rank than `rank`: zero rows
            layer.lora_B[name].zero_()[:, : b.shape[1]].copy_(b)
            norm = float(delta.pow(2).sum())
            err2 += err * err * norm
            norm2 += norm
    return (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0


def dev_objective(dev_samples) -> Callable:
    """Mean log-likelihood of the assistant answers of `dev_samples` (higher is better)."""

    def objective(model) -> float:
        with torch.no_grad():
            total, count = 0.0, 0
            for s in dev_samples:
                inputs = model.prepare_conversations([s.conversations], [s.media])
                out = model(inputs)
                n = int((inputs.labels != -100).sum())
                total -= float(out.loss) * n
                count += n
        return total / max(count, 1)

    return objective


def _install_dense_text_delta(model, merged: dict[str, torch.Tensor], name: str = "text-merged") -> None:
    """Put merged deltas in as an exact adapter (A = I, B = dW, scaling 1): no SVD, for evaluation."""
    layers = routed_layers(model.llm)
    if name not in model.lora_adapters:
        for layer in layers.values():
            layer.add_adapter(name, layer.in_features, float(layer.in_features))
    with torch.no_grad():
        for path, delta in merged.items():
            layer = layers[path]
            layer.lora_A[name].copy_(torch.eye(layer.in_features))
            layer.lora_B[name].copy_(delta)


def search_weights(
    models: Mapping[str, str | os.PathLike],
    dev_samples,
    *,
    method: str = "naivemc",
    merge: str = LINEAR,
    merge_params: Mapping[str, Any] | None = None,
    convert: bool = False,
    lora_rank: int | None = None,
    budget: int = 30,
    seed: int = 0,
    bounds: tuple[float, float] = (0.0, 1.5),
    merge_space: str = "delta",
) -> tuple[dict[str, float], float]:
    """Adaptive per-model weights: CMA-ES over λ_m maximising the mean answer log-likelihood on
    `dev_samples` (a validation split). Linear merges only change route coefficients per
    evaluation; PCB reuses its scores across evaluations (`mcomp.merge.search`)."""
    from mcomp.merge.search import cma_search, search_coefficients

    del lora_rank  # the final composition uses it; the search evaluates exact dense deltas
    if merge_space != "delta":
        raise ValueError(
            "the weight search evaluates merges of the text deltas (merge_space='delta'); "
            f"it cannot search for merge_space={merge_space!r}"
        )
    model = compose(models, method=method, merge=LINEAR, convert=convert)
    names = model.modalities
    objective = dev_objective(dev_samples)
    modality_routes = {m: [(m, 1.0)] for m in names} if method == "damc" else {}

    if merge == LINEAR:

        def loss(w: list[float]) -> float:
            model.set_routes({TEXT_ROUTE: [(f"text-{m}", c) for m, c in zip(names, w)], **modality_routes})
            return -objective(model)

        best_w, best_loss, _ = cma_search(loss, len(names), bounds=bounds, budget=budget, seed=seed)
        return dict(zip(names, best_w)), -best_loss

    layers = routed_layers(model.llm)
    deltas = [{p: layer.delta_weight([(f"text-{m}", 1.0)]) for p, layer in layers.items()} for m in names]
    zeros = {p: torch.zeros_like(t) for p, t in deltas[0].items()}
    originals = {p: layer.base_layer.weight.detach().clone() for p, layer in layers.items()}
    for m in names:
        _remove_adapter(model, f"text-{m}")

    def evaluate(merged: dict[str, torch.Tensor]) -> float:
        if method == "naivemc":
            with torch.no_grad():
                for p, layer in layers.items():
                    layer.base_layer.weight.copy_(originals[p] + merged[p].to(originals[p].dtype))
            model.set_routes(modality_routes)
        else:
            _install_dense_text_delta(model, merged)
            model.set_routes({TEXT_ROUTE: [("text-merged", 1.0)], **modality_routes})
        return objective(model)

    result = search_coefficients(
        zeros,
        deltas,
        evaluate,
        method=merge,
        bounds=bounds,
        budget=budget,
        seed=seed,
        maximize=True,
        **dict(merge_params or {}),
    )
    return dict(zip(names, result.weights)), result.score
