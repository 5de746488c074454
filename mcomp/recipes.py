"""Training recipes: published hyper-parameters as TrainConfig fields, kept as data in
`configs/recipes/<name>.yaml` (`common` fields, then per modality one entry per run kind:
`stage1`, `naivemc` (stage 2, one LoRA) or `damc` (stage 2, decoupled))."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from mcomp.resources import load_config


def available_recipes() -> list[str]:
    folder = Path(str(files("mcomp.configs").joinpath("recipes")))
    return sorted(p.stem for p in folder.glob("*.yaml"))


def run_kind(stage: int, decoupled: bool) -> str:
    return "stage1" if stage == 1 else "damc" if decoupled else "naivemc"


def recipe_fields(name: str, modality: str, stage: int, decoupled: bool) -> dict[str, Any]:
    """The TrainConfig fields recipe `name` gives a `modality` model's run of that stage and kind."""
    if name not in available_recipes():
        raise ValueError(f"unknown training recipe {name!r}; available: {', '.join(available_recipes())}")
    recipe = load_config("recipes", f"{name}.yaml")
    runs = recipe["runs"]
    if modality not in runs:
        raise ValueError(f"recipe {name!r} has no runs for modality {modality!r} (it has: {', '.join(runs)})")
    kind = run_kind(stage, decoupled)
    if kind not in runs[modality]:
        raise ValueError(f"recipe {name!r} has no {kind} run for {modality} (it has: {', '.join(runs[modality])})")
    return {**recipe.get("common", {}), **runs[modality][kind], "stage": stage, "decoupled": decoupled}
