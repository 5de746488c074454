"""Checkpoint of a multimodal model (safetensors only).

DIR/
  mcomp_config.json          MLLMConfig: base-model reference + checksum, template, adapter configs
  projectors.safetensors     "<modality>.<param>" for every projector
  encoders.safetensors       encoder weights of adapters not loaded from a file (random-init towers)
  lora/<name>/               each LoRA adapter in peft format (adapter_config.json +
                             adapter_model.safetensors); routes in mcomp_config.json
  modality_tokens.safetensors  DAMC prefix/suffix tokens ("prefix.<modality>", "suffix.<modality>")
  tokenizer files            the tokenizer the model was built with
  base/                      the base LLM, only when it has no directory of its own to refer to
  llm/                       a full fine-tune's LLM (transformers directory, sharded safetensors);
                             base_model then names the base it was fine-tuned from, llm_sha256
                             checks its weight files
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mcomp.configuration import JsonConfig
from mcomp.fingerprint import tensors_sha256
from mcomp.io import atomic_directory, check_state_dict, load_tensors, save_tensors, sha256_file
from mcomp.tokenization import save_tokenizer
from mcomp.version import __version__

if TYPE_CHECKING:
    from mcomp.output_record import OutputRecord

logger = logging.getLogger(__name__)

CONFIG_NAME = "mcomp_config.json"
LLM_DIR = "llm"
FORMAT = "mcomp-mllm"
FORMAT_VERSION = 1


@dataclasses.dataclass
class MLLMConfig(JsonConfig):
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    mcomp_version: str = ""
    base_model: str = ""  # transformers directory; relative paths are relative to the checkpoint
    base_model_sha256: str = ""  # checksum of the base LLM weights (LoRA excluded)
    base_model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    template: str = "vicuna_v1"
    adapters: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lora: dict[str, Any] | None = None  # {"spec": LoraSpec, "adapters": [names], "routes": {route: [[name, coef]]}}
    llm: str | None = None  # a full fine-tune: the folder of its LLM (relative to the checkpoint)
    llm_sha256: str = ""  # checksum of that folder's weight files (`llm_files_sha256`)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)


def base_state_dict(llm) -> dict[str, torch.Tensor]:
    """The base LLM's own weights, with LoRA layers looked through."""
    out = {}
    for name, tensor in llm.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def base_weights_sha256(llm) -> str:
    """Checksum over names, dtypes, shapes and bytes of the base weights (order independent)."""
    return tensors_sha256(base_state_dict(llm))


def base_reference(llm) -> dict[str, str]:
    """{"base_model", "base_model_sha256"} of an LLM loaded from a folder, before it is fine-tuned
    (the fine-tune is saved as a delta of that base, which must therefore stay where it is)."""
    folder = _base_directory(llm)
    if folder is None:
        raise ValueError(
            "full fine-tuning needs a base LLM loaded from a folder (its reference is saved with the "
            "fine-tune): save the base with save_pretrained and load it from there"
        )
    return {"base_model": folder, "base_model_sha256": base_weights_sha256(llm)}


def _base_directory(llm) -> str | None:
    path = getattr(llm, "name_or_path", "") or getattr(llm.config, "_name_or_path", "")
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return os.path.abspath(path)
    return None


def llm_files_sha256(folder: str | os.PathLike) -> str:
    """sha256 over the names and bytes of a transformers folder's safetensors files, read in blocks
    (a fine-tuned LLM is checked without holding it in memory)."""
    from mcomp.io import find_weight_files

    h = hashlib.sha256()
    for f in find_weight_files(folder, formats=("safetensors",)):
        h.update(f.name.encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def _save_llm(llm, path: Path, max_shard_size: str | int = "5GB") -> None:
    """An LLM (LoRA layers looked through) as a transformers folder: config, generation config,
    sharded safetensors. The pristine base of a checkpoint (base/) and a full fine-tune (llm/)."""
    from mcomp.merge.sources import TensorInfo
    from mcomp.merge.writer import ShardedWriter, parse_size

    path.mkdir(parents=True)
    llm.config.save_pretrained(path)
    if getattr(llm, "generation_config", None) is not None:
        llm.generation_config.save_pretrained(path)
    state = base_state_dict(llm)
    if getattr(llm.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    layout = [(k, TensorInfo(tuple(v.shape), v.dtype)) for k, v in state.items()]
    writer = ShardedWriter(path, layout, parse_size(max_shard_size))
    try:
        for k, v in state.items():
            writer.write(k, v.detach().reshape(-1).cpu())
        writer.close()
    except BaseException:
        writer.abort()
        raise


def save_mllm(
    model,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    base_model: str | None = None,
    inputs=(),
    record: OutputRecord | None = None,
) -> None:
    """Save atomically: the directory appears only when every file is written (`mcomp.io.atomic_directory`:
    `path` must not be, contain or lie inside any of `inputs` nor the base model's directory). `record`
    (`mcomp.output_record.OutputRecord`): the recipe and model card written with it."""
    from mcomp.peft_format import save_adapter

    finetuned_from = getattr(model, "finetuned_from", None)
    base_dir = finetuned_from["base_model"] if finetuned_from else base_model or _base_directory(model.llm)
    with atomic_directory(path, overwrite=overwrite, inputs=[base_dir, *inputs]) as tmp:
        if finetuned_from:
            _save_llm(model.llm, tmp / LLM_DIR)
            base_ref = base_dir
        elif base_dir is None:
            _save_llm(model.llm, tmp / "base")
            base_ref = "base"
        else:
            base_ref = os.path.abspath(base_dir)
        adapters = []
        projectors, encoders = {}, {}
        for modality, adapter in model.adapters.items():
            adapters.append(adapter.config.to_dict())
            for k, v in adapter.projector.state_dict().items():
                projectors[f"{modality}.{k}"] = v
            if getattr(adapter.config, "checkpoint", None) is None:  # random init: weights must travel
                for k, v in adapter.encoder.state_dict().items():
                    encoders[f"{modality}.{k}"] = v
        save_tensors(projectors, tmp / "projectors.safetensors")
        if encoders:
            save_tensors(encoders, tmp / "encoders.safetensors")
        lora = None
        if model.lora_spec is not None:
            for name in model.lora_adapters:
                save_adapter(model.llm, name, tmp / "lora" / name, base_model_name=base_ref)
            lora = {
                "spec": model.lora_spec.to_dict(),
                "adapters": model.lora_adapters,
                "routes": {r: [[n, c] for n, c in t] for r, t in model.routing.routes.items()},
            }
        tokens = {f"prefix.{m}": t for m, t in model.prefix_tokens.items()}
        tokens.update({f"suffix.{m}": t for m, t in model.suffix_tokens.items()})
        if tokens:
            save_tensors(tokens, tmp / "modality_tokens.safetensors")
        save_tokenizer(model.tokenizer, tmp)
        text_cfg = model.llm.config.get_text_config()
        MLLMConfig(
            mcomp_version=__version__,
            base_model=base_ref,
            base_model_sha256=finetuned_from["base_model_sha256"] if finetuned_from else base_weights_sha256(model.llm),
            base_model_config={
                "model_type": text_cfg.model_type,
                "hidden_size": text_cfg.hidden_size,
                "num_hidden_layers": text_cfg.num_hidden_layers,
                "vocab_size": text_cfg.vocab_size,
            },
            template=model.template.name,
            adapters=adapters,
            lora=lora,
            llm=LLM_DIR if finetuned_from else None,
            llm_sha256=llm_files_sha256(tmp / LLM_DIR) if finetuned_from else "",
            provenance=model.provenance,
        ).to_json_file(tmp / CONFIG_NAME)
        if record is not None:
            record.write(tmp)
    logger.info("saved multimodal model to %s", path)


# adapter-config fields that may name files saved with the model: relative to its directory there
# (so that a model directory can move, and the same model saved elsewhere has the same bytes)
ADAPTER_PATH_FIELDS = ("checkpoint", "image_processor", "video_processor")


def inside_paths(adapter: dict, model_dir: str | os.PathLike) -> dict:
    """`adapter` (a saved adapter config) with its relative file fields resolved against `model_dir`."""
    out = dict(adapter)
    for name in ADAPTER_PATH_FIELDS:
        value = out.get(name)
        if isinstance(value, str) and value and not os.path.isabs(value):
            out[name] = str(Path(model_dir).resolve() / value)
    return out


def read_config(path: str | os.PathLike) -> MLLMConfig:
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: not an mcomp model directory (no {CONFIG_NAME})")
    cfg = MLLMConfig.from_json_file(cfg_path)
    if cfg.format != FORMAT or cfg.format_version > FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: unsupported format {cfg.format!r} version {cfg.format_version}")
    return cfg


def resolve_base(path: str | os.PathLike, cfg: MLLMConfig) -> Path:
    base = Path(cfg.base_model)
    if not base.is_absolute():
        base = Path(path) / base
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"{path}: base model directory {base} (from {CONFIG_NAME}: base_model) not found")
    return base


def load_mllm(
    path: str | os.PathLike,
    model_class,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    check_base: bool = True,
):
    """The model saved at `path`, built by `model_class.build` (`MultimodalLM.from_pretrained` passes
    itself, so that this format module does not depend on the model module)."""
    from transformers import AutoTokenizer

    from mcomp.lora import LoraSpec
    from mcomp.peft_format import load_adapter_into

    path = Path(path)
    cfg = read_config(path)
    if cfg.llm:
        llm = load_finetuned_llm(path, cfg, dtype, check=check_base)
    else:
        llm = load_base_llm(path, cfg, dtype, check=check_base)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    model = model_class.build(llm, tokenizer, [inside_paths(a, path) for a in cfg.adapters], template=cfg.template)
    model.provenance = cfg.provenance
    if cfg.llm:
        model.finetuned_from = {"base_model": cfg.base_model, "base_model_sha256": cfg.base_model_sha256}
    tensors = read_adapter_tensors(path)
    for modality in model.adapters:
        load_adapter_weights(model, modality, path, tensors)
    if cfg.lora:
        for name in cfg.lora["adapters"]:
            load_adapter_into(model, path / "lora" / name, name)
        model.lora_spec = LoraSpec.from_dict(cfg.lora["spec"], source=f"{path}/{CONFIG_NAME}: lora.spec")
        model.set_routes({r: [(n, c) for n, c in t] for r, t in cfg.lora["routes"].items()})
    load_modality_tokens(model, path)
    return model.to(device).eval()


def load_finetuned_llm(path: Path, cfg: MLLMConfig, dtype: torch.dtype | None = None, check: bool = True):
    """A full fine-tune's LLM from its folder, its weight files checked against `llm_sha256` first."""
    from transformers import AutoModelForCausalLM

    folder = path / cfg.llm
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the fine-tuned LLM folder {folder} (from {CONFIG_NAME}: llm) is missing")
    if check and cfg.llm_sha256 and llm_files_sha256(folder) != cfg.llm_sha256:
        raise ValueError(
            f"{path}: the weight files in {folder} are not the ones this checkpoint was saved with "
            f"(their checksum differs from llm_sha256 in {CONFIG_NAME})"
        )
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or "auto", trust_remote_code=False)


def load_base_llm(path: Path, cfg: MLLMConfig, dtype: torch.dtype | None = None, check: bool = True):
    """The base LLM a LoRA checkpoint refers to, checked against `base_model_sha256`."""
    from transformers import AutoModelForCausalLM

    base = resolve_base(path, cfg)
    llm = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype or "auto", trust_remote_code=False)
    if check and cfg.base_model_sha256 and base_weights_sha256(llm) != cfg.base_model_sha256:
        raise ValueError(
            f"{path}: the base model at {base} is not the one this checkpoint was trained on "
            f"(weights checksum differs from base_model_sha256 in {CONFIG_NAME})"
        )
    return llm


def load_adapter_weights(model, modality: str, path: str | os.PathLike, tensors: dict | None = None) -> None:
    """Projector (and, for random-init encoders, encoder) weights of `modality` from checkpoint
    `path`; `tensors` = {"projectors": ..., "encoders": ...} already read, to read each file once."""
    path = Path(path)
    tensors = tensors if tensors is not None else read_adapter_tensors(path)
    adapter = model.adapters[modality]
    _load_prefixed(adapter.projector, tensors["projectors"], modality, path / "projectors.safetensors")
    if getattr(adapter.config, "checkpoint", None) is None:
        _load_prefixed(adapter.encoder, tensors["encoders"], modality, path / "encoders.safetensors")
        adapter.forget_fingerprint()


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    path = Path(path)
    encoders = path / "encoders.safetensors"
    return {
        "projectors": load_tensors(path / "projectors.safetensors"),
        "encoders": load_tensors(encoders) if encoders.is_file() else {},
    }


def load_modality_tokens(model, path: str | os.PathLike, only: str | None = None) -> None:
    """DAMC prefix/suffix tokens saved in `path` (all, or those of modality `only`)."""
    tokens_path = Path(path) / "modality_tokens.safetensors"
    if not tokens_path.is_file():
        return
    for key, value in load_tensors(tokens_path).items():
        kind, modality = key.split(".", 1)
        if only is not None and modality != only:
            continue
        if modality not in model.adapters or kind not in ("prefix", "suffix"):
            raise ValueError(f"{tokens_path}: unexpected tensor {key!r}")
        model.add_modality_tokens(
            modality, value.shape[0] if kind == "prefix" else 0, value.shape[0] if kind == "suffix" else 0
        )
        getattr(model, f"{kind}_tokens")[modality].data.copy_(value)


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """Checksum of the tokenizer files saved with a checkpoint (same tokenizer <=> same files)."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _load_prefixed(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: Path) -> None:
    state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    check_state_dict(module.state_dict(), state, source, repr(prefix))
    module.load_state_dict(state, strict=True)
