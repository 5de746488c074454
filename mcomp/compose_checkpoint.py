"""NaiveMC written straight to disk, for inputs whose LLM is a full fine-tune.

Each input's LLM delta goes through the streaming merge engine one tensor slice at a time: a full
fine-tune's ΔW = W_ft − W_base read from its `llm/` shards, a LoRA input's ΔW = s·B·A of its text
adapter materialised per tensor (`mcomp.merge.lora.LoraSource`). So peak memory is a few chunks per
input, whatever the model size or count. The merged LLM is written as sharded safetensors (the
output's `llm/`), next to every input's encoder and projector; the output is a full fine-tune of the
inputs' base and loads with `mcomp.load`.

Coefficients mean what they mean in `mcomp.compose`: θ = θ0 + Σ λ_m ΔW_m for a linear merge (the
engine's `task_arithmetic`), each backend's own rule otherwise. DAMC needs decoupled LoRA parameters,
which a full fine-tune does not have, so it is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from mcomp.checkpoint import CONFIG_NAME, LLM_DIR, MLLMConfig, llm_files_sha256, read_adapter_tensors, resolve_base
from mcomp.io import atomic_directory, save_tensors, sha256_file
from mcomp.lora import TEXT_ROUTE
from mcomp.tokenization import save_tokenizer
from mcomp.version import __version__

if TYPE_CHECKING:
    from mcomp.output_record import OutputRecord

logger = logging.getLogger(__name__)


def llm_source(inp) -> Path:
    """What carries an input's LLM delta: its fine-tuned `llm/` or its text LoRA (peft format)."""
    if inp.config.llm:
        return inp.path / inp.config.llm
    if TEXT_ROUTE not in inp.lora_adapters:
        raise ValueError(f"{inp.path}: has neither a fine-tuned LLM nor a text LoRA to merge (a stage-1 model?)")
    if inp.decoupled:
        logger.warning("%s was trained decoupled; NaiveMC uses only its text LoRA", inp.path)
    return inp.path / "lora" / TEXT_ROUTE


def compose_checkpoint(
    models: Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    method: str = "naivemc",
    merge: str = "linear",
    weights: Mapping[str, float] | None = None,
    merge_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    record: OutputRecord | None = None,
) -> Path:
    """Compose `modality -> model directory` inputs (LoRA or full fine-tunes of one base) into `out`.
    `record` (`mcomp.output_record.OutputRecord`): the recipe and model card written with it."""
    from transformers import AutoTokenizer

    from mcomp.compose import LINEAR, coefficients, merge_parameters, model_groups, read_inputs, set_weights
    from mcomp.merge import merge_checkpoints

    if method != "naivemc":
        raise ValueError(
            f"method {method!r} with a full fine-tune input: DAMC keeps each modality's own parameters apart "
            "from the text ones (decoupled LoRA), and a full fine-tune has no such split; use naivemc"
        )
    inputs = read_inputs(models)
    coef = coefficients(inputs, weights, merge)
    groups = model_groups(inputs)
    sources = [llm_source(g[0]) for g in groups]
    first = inputs[0]
    base = resolve_base(first.path, first.config)
    report: dict[str, Any] = {}
    params = merge_parameters(merge, merge_params, seed, report)
    set_weights(params, [model_weight(g, coef) for g in groups])
    engine_method = "task_arithmetic" if merge == LINEAR else merge
    with atomic_directory(out, overwrite=overwrite, inputs=[base, *(i.path for i in inputs)]) as tmp:
        merged = merge_checkpoints(
            base, sources, tmp / LLM_DIR, engine_method, max_shard_size=max_shard_size, progress=progress, **params
        )
        report["passes"] = merged.passes
        _write_adapters(inputs, tmp)
        save_tokenizer(AutoTokenizer.from_pretrained(str(first.path), trust_remote_code=False), tmp)
        MLLMConfig(
            mcomp_version=__version__,
            base_model=str(base.resolve()),
            base_model_sha256=first.config.base_model_sha256,
            base_model_config=first.config.base_model_config,
            template=first.config.template,
            adapters=[i.adapter for i in inputs],
            llm=LLM_DIR,
            llm_sha256=llm_files_sha256(tmp / LLM_DIR),
            provenance={
                "composition": {
                    "method": method,
                    "merge": merge,
                    "weights": coef,
                    "merge_params": dict(merge_params or {}),
                    **report,
                    "inputs": [
                        {
                            "modality": i.modality,
                            "path": str(i.path.resolve()),
                            "llm": "full fine-tune" if i.config.llm else "LoRA",
                            "config_sha256": sha256_file(i.path / CONFIG_NAME),
                            "base_model_sha256": i.config.base_model_sha256,
                        }
                        for i in inputs
                    ],
                }
            },
        ).to_json_file(tmp / CONFIG_NAME)
        if record is not None:
            record.write(tmp, {"coefficients": coef, **report})
    logger.info("composed %s into %s", ", ".join(i.modality for i in inputs), out)
    return Path(out)


def model_weight(group, coef: Mapping[str, float]) -> float:
    """The coefficient of a model named for several modalities: theirs, which must agree."""
    values = {coef[i.modality] for i in group}
    if len(values) > 1:
        named = {i.modality: coef[i.modality] for i in group}
        raise ValueError(f"{group[0].path} is one model but its modalities have different weights {named}")
    return values.pop()


def _write_adapters(inputs, tmp: Path) -> None:
    """Every input's projector and (random-init) encoder tensors, under its modality's prefix as
    each input already stores them (`mcomp.checkpoint.read_adapter_tensors`)."""
    merged: dict[str, dict] = {"projectors": {}, "encoders": {}}
    for inp in inputs:
        for kind, tensors in read_adapter_tensors(inp.path).items():
            merged[kind].update({k: v for k, v in tensors.items() if k.startswith(inp.modality + ".")})
    save_tensors(merged["projectors"], tmp / "projectors.safetensors")
    if merged["encoders"]:
        save_tensors(merged["encoders"], tmp / "encoders.safetensors")
