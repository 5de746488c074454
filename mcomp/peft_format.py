"""Routed LoRA adapters saved and loaded in peft's on-disk format.

Each adapter is a folder with `adapter_config.json` (written by peft's own LoraConfig) and
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_{A,B}.weight`, so a
peft user can load any single adapter with `PeftModel.from_pretrained(base, folder)`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from mcomp.io import atomic_write_text, load_tensors, save_tensors
from mcomp.lora import LoraSpec, routed_layers

PREFIX = "base_model.model."


def write_adapter_config(folder: str | os.PathLike, spec: LoraSpec, base_model_name: str = "") -> None:
    """peft's own `adapter_config.json` for `spec`, with its fields in a fixed order (peft keeps
    target_modules as a set, whose order changes from run to run)."""
    from peft import LoraConfig

    path = Path(folder) / "adapter_config.json"
    LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=sorted(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name or None,
    ).save_pretrained(str(folder))
    data = json.loads(path.read_text(encoding="utf-8"))
    data["target_modules"] = sorted(data["target_modules"])
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_adapter(
    folder: str | os.PathLike,
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    spec: LoraSpec | None = None,
    base_model_name: str = "",
    config: Mapping | None = None,
) -> None:
    """The one peft LoRA writer: `adapter_model.safetensors` ({module path: (A, B)} under peft's keys
    `base_model.model.<module path>.lora_{A,B}.weight`) and `adapter_config.json`, peft's own for
    `spec`, or `config` as given (keys sorted)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config is None:
        write_adapter_config(folder, spec, base_model_name)
    else:
        atomic_write_text(folder / "adapter_config.json", json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    tensors = {}
    for path, (a, b) in pairs.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b
    save_tensors(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def save_adapter(llm, name: str, folder: str | os.PathLike, base_model_name: str = "") -> None:
    layers = routed_layers(llm)
    some = next(iter(layers.values()))
    if name not in some.lora_A:
        raise KeyError(f"no LoRA adapter {name!r} (have {list(some.lora_A)})")
    r = some.lora_A[name].shape[0]
    alpha = some.scaling[name] * r
    targets = sorted({path.rsplit(".", 1)[-1] for path in layers})
    write_adapter(
        folder,
        {path: (layer.lora_A[name], layer.lora_B[name]) for path, layer in layers.items()},
        spec=LoraSpec(r=r, alpha=alpha, dropout=some.dropout[name], target_modules=targets),
        base_model_name=base_model_name,
    )


# a LoRA weight key: peft's prefix (optional), the module path, lora_A/B, an adapter name (optional)
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def read_peft_lora(
    folder: str | os.PathLike, strict: bool = True
) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The one peft LoRA reader: (adapter_config.json, {module path: (A, B)}).

    Refuses what is not a plain LoRA (another peft_type, DoRA, LoRA on embeddings), an A without its
    B, and ranks that disagree; `strict` also refuses any other tensor in the file (mcomp's own
    adapters hold nothing else), else such tensors are skipped."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (not a peft LoRA folder)")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise ValueError(f"{folder}: DoRA adapters are not supported (their update is not (α/r)·B·A)")
    weights_path = folder / "adapter_model.safetensors"
    if not weights_path.is_file() and (folder / "adapter_model.bin").is_file():
        weights_path = folder / "adapter_model.bin"
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_tensors(weights_path).items():
        m = LORA_KEY.match(key)
        if m is None:
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise ValueError(f"{weights_path}: {key!r}: only LoRA on linear weights (lora_A/lora_B) is supported")
            if strict:
                raise ValueError(f"{weights_path}: unexpected tensor {key!r} (only LoRA A/B weights are supported)")
            continue
        pairs.setdefault(m["module"], {})[m["ab"]] = value
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_path}: module {module} lacks lora_{({'A', 'B'} - set(ab)).pop()}")
        if ab["B"].shape[1] != ab["A"].shape[0]:
            raise ValueError(
                f"{weights_path}: module {module}: lora_A rank {ab['A'].shape[0]} "
                f"but lora_B shape {list(ab['B'].shape)}"
            )
        out[module] = (ab["A"], ab["B"])
    return config, out


def read_adapter(folder: str | os.PathLike) -> tuple[LoraSpec, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(spec, {module path: (A, B)}) of an adapter mcomp wrote (`read_peft_lora`, strict)."""
    cfg, pairs = read_peft_lora(folder, strict=True)
    targets = cfg.get("target_modules") or []
    spec = LoraSpec(
        r=int(cfg["r"]),
        alpha=float(cfg["lora_alpha"]),
        dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=sorted(targets) if isinstance(targets, list) else [targets],
    )
    return spec, pairs


def load_adapter_into(model, folder: str | os.PathLike, name: str) -> None:
    """Add the peft LoRA in `folder` to `model` (a MultimodalLM) as adapter `name`."""
    spec, pairs = read_adapter(folder)
    model.add_lora(
        LoraSpec(
            r=spec.r,
            alpha=spec.alpha,
            dropout=spec.dropout,
            target_modules=model.lora_spec.target_modules if model.lora_spec else spec.target_modules,
        ),
        name=name,
    )
    layers = routed_layers(model.llm)
    missing = sorted(set(layers) - set(pairs))
    unexpected = sorted(set(pairs) - set(layers))
    if missing or unexpected:
        raise ValueError(
            f"{folder}: LoRA modules do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for path, (a, b) in pairs.items():
            layer = layers[path]
            if tuple(a.shape) != tuple(layer.lora_A[name].shape) or tuple(b.shape) != tuple(layer.lora_B[name].shape):
                raise ValueError(
                    f"{folder}: {path}: LoRA shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit "
                    f"the layer ({layer.in_features} -> {layer.out_features}, r={spec.r})"
                )
            layer.lora_A[name].copy_(a)
            layer.lora_B[name].copy_(b)
