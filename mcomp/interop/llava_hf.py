"""transformers-native LLaVA models into mcomp's format: a modality model whose LLM is a full fine-tune
of `--base`. `LlavaForConditionalGeneration` (e.g. llava-hf/llava-1.5-7b-hf) gives an image model;
`VideoLlavaForConditionalGeneration` (LanguageBind/Video-LLaVA-7B-hf) a video model (its video tower; the
image tower is left out, as the LLaVA image model covers images); `LlavaOnevisionForConditionalGeneration`
(llava-hf/llava-onevision-qwen2-7b-ov-hf) a model of both, anyres images and pooled videos through one
SigLIP tower (`mcomp.encoders.onevision`).

What the folder holds, and where it goes:

* the language model (`language_model.model.*`, `language_model.lm_head.*` as saved; `model.language_model.*`
  and `lm_head.*` as transformers 5 names them in memory) -> `llm/`, LlamaForCausalLM names, sharded
  safetensors, streamed one tensor at a time. Its architecture must be the base's; the rows LLaVA added
  to the vocabulary (the `<image>` and pad tokens, ids from the base's vocabulary size on, and padding
  rows) are dropped: mcomp puts the image features where `<image>` is and never embeds or predicts
  either token. The import checks that the folder's tokenizer is the base's plus added special tokens.
* the vision (or video) tower: CLIP (LLaVA, Video-LLaVA) -> an open_clip tower file
  (`mcomp.interop.clip_weights`); OneVision's SigLIP stays in transformers' layout. `vision_feature_layer`
  -> `select_layer`; for LLaVA images `vision_feature_select_strategy` default/full -> `select_feature`
  patch/cls_patch; Video-LLaVA's videos keep every token of each of their `video_seq_length / tokens per
  frame` frames; OneVision keeps the strategy, its `image_grid_pinpoints` and `vision_aspect_ratio`.
* `multi_modal_projector.linear_{1,2}` with `projector_hidden_act` gelu -> the `mlp2x_gelu` projector
  (OneVision's with its `image_newline`).
* the image (video) processor config -> `processor/`, the adapter's preprocessing as the folder defines it.
* the tokenizer: the folder's (its `<image>` token is tokenised in place, as its processor does); its
  pad token, an added id, becomes the unknown token.

Was the model fine-tuned from this base? The import measures the delta of the language model,
‖W_ft − W_base‖ / ‖W_base‖ over all its tensors (the shared vocabulary rows only), records it, and
refuses the base when it exceeds `max_relative_delta` (default 0.5): a fine-tune moves the weights by a
few percent, while two independently trained or initialised models differ by about √2.

The conversation template (`template`): by default OneVision uses its own chat template (template "chat":
the folder tokenizer's, else its processor's), and LLaVA-1.5 and Video-LLaVA use `vicuna_v1`, the
conversation they were trained with (their processors' templates render the same USER/ASSISTANT turns
without the system line); "chat" or a template name chooses. The folder's template is recorded either way.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mcomp.checkpoint import CONFIG_NAME, LLM_DIR, MLLMConfig, base_weights_sha256, llm_files_sha256
from mcomp.encoders.weights import read_json
from mcomp.interop.clip_weights import convert_hf_state_dict, hf_vision_config
from mcomp.io import atomic_directory, save_tensors
from mcomp.merge.sources import SafetensorsCheckpoint, TensorInfo
from mcomp.merge.writer import ShardedWriter, parse_size
from mcomp.tokenization import vocabulary_difference
from mcomp.version import __version__

if TYPE_CHECKING:
    from mcomp.output_record import OutputRecord

logger = logging.getLogger(__name__)

# architecture -> (the modalities imported, the key prefix of their tower)
SUPPORTED = {
    "LlavaForConditionalGeneration": (("image",), "vision_tower."),
    "VideoLlavaForConditionalGeneration": (("video",), "video_tower."),
    "LlavaOnevisionForConditionalGeneration": (("image", "video"), "vision_tower."),
}
ONEVISION = "LlavaOnevisionForConditionalGeneration"
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
)
ENCODER_FILE = "encoder_weights/{modality}.safetensors"
PROCESSOR_DIR = "processor"
LLM_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."))
LLM_HEADS = ("language_model.lm_head.", "lm_head.")
TOWER_PREFIXES = ("vision_tower.", "image_tower.", "video_tower.")
VOCAB_ROWS = {"model.embed_tokens.weight", "lm_head.weight"}  # one row per token id
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
NEWLINE_KEYS = ("image_newline", "model.image_newline")  # OneVision's row separator, kept with the projector
TOWER_CONFIG_EXTRAS = ("transformers_version", "architectures", "dtype", "torch_dtype")  # not the tower's shape


def split_keys(keys: list[str], source: str) -> dict[str, dict[str, str]]:
    """The folder's tensor names by part: {"llm": {LlamaForCausalLM name: folder name}, "projector": {...},
    and one entry per vision tower ("vision_tower.", "image_tower.", "video_tower.")}."""
    parts: dict[str, dict[str, str]] = {"llm": {}, "projector": {}, **{t: {} for t in TOWER_PREFIXES}}
    stray = []
    for key in keys:
        for prefix, to in LLM_PREFIXES:
            if key.startswith(prefix):
                parts["llm"][to + key[len(prefix) :]] = key
                break
        else:
            head = next((h for h in LLM_HEADS if key.startswith(h)), None)
            name = key[len("model.") :] if key.startswith("model.") else key
            tower = next((t for t in TOWER_PREFIXES if name.startswith(t)), None)
            projector = next((p for p in PROJECTOR_PREFIXES if key.startswith(p)), None)
            if key in NEWLINE_KEYS:
                parts["projector"]["image_newline"] = key
            elif head:
                parts["llm"]["lm_head." + key[len(head) :]] = key
            elif tower:
                parts[tower][name[len(tower) :]] = key
            elif projector:
                parts["projector"][key[len(projector) :]] = key
            else:
                stray.append(key)
    if stray:
        raise ValueError(
            f"{source}: tensors that are not LLaVA's language model, vision towers or projector: {stray[:5]}"
        )
    return parts


def check_architecture(text: dict[str, Any], base: dict[str, Any], source: str) -> None:
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(base.get("model_type", "llama")).to_dict()
    differ = [
        f"{f}: {text.get(f, defaults.get(f))!r} here, {base.get(f, defaults.get(f))!r} in the base"
        for f in ARCHITECTURE_FIELDS
        if text.get(f, defaults.get(f)) != base.get(f, defaults.get(f))
    ]
    if differ:
        raise ValueError(f"{source}: the language model's architecture is not the base's ({'; '.join(differ)})")


def _projector(state: dict[str, torch.Tensor], act: str, newline: bool, source: str) -> dict[str, torch.Tensor]:
    """The projector's tensors in mcomp's names: `mlp2x_gelu`'s `0.*`, `2.*` (under `mlp.`, with
    `image_newline`, for OneVision's `NewlineProjector`)."""
    if act != "gelu":
        raise ValueError(f"{source}: projector_hidden_act {act!r}; mcomp's mlp2x_gelu projector is gelu")
    expected = {f"linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")} | (
        {"image_newline"} if newline else set()
    )
    if set(state) != expected:
        raise ValueError(f"{source}: multi_modal_projector tensors {sorted(state)}; expected {sorted(expected)}")
    prefix = "mlp." if newline else ""
    return {
        k if k == "image_newline" else f"{prefix}{0 if k.startswith('linear_1') else 2}.{k.split('.', 1)[1]}": v
        for k, v in state.items()
    }


def _check_tokenizer(tokenizer, base_tokenizer, source: str) -> None:
    """The folder's tokenizer is the base's plus added special tokens (whose LLM rows are dropped; rows
    past the tokenizer's length are padding, with no token at all)."""
    differ = vocabulary_difference(tokenizer, base_tokenizer)
    if differ:
        raise ValueError(f"{source}: the tokenizer is not the base's plus added special tokens ({differ})")


def _read_part(folder: SafetensorsCheckpoint, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{our name: tensor} of one part of the folder ({our name: the folder's name})."""
    return {k: folder.read(v, 0, folder.infos[v].numel).reshape(folder.infos[v].shape) for k, v in names.items()}


def _adapter_config(
    modality: str, config: dict, tower: dict, checkpoint: str, processor: str, layer: int, strategy: str
):
    """The mcomp adapter config of the imported tower, preprocessing by the folder's `processor`:
    LLaVA's images drop the CLS token under the "default" strategy; Video-LLaVA's videos keep every
    token of every frame, CLS first, as mcomp's video adapter does."""
    common = dict(tower_config=tower, checkpoint=checkpoint, select_layer=layer)
    if modality == "image":
        from mcomp.encoders.image import ImageAdapterConfig

        select = "patch" if strategy == "default" else "cls_patch"
        return ImageAdapterConfig(**common, select_feature=select, image_processor=processor)
    from mcomp.encoders.video import VideoAdapterConfig

    vision = tower["vision_cfg"]
    tokens_per_frame = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    frames = int(config.get("video_seq_length") or 8 * tokens_per_frame) // tokens_per_frame
    return VideoAdapterConfig(**common, num_frames=frames, video_processor=processor)


def _onevision_adapter_config(
    modality: str, config: dict, tower: dict, checkpoint: str, processor: str, layer: int, strategy: str, frames: int
):
    """OneVision's adapters: anyres images by the folder's pinpoints, videos of `frames` frames."""
    from mcomp.encoders.onevision import OnevisionImageAdapterConfig, OnevisionVideoAdapterConfig

    common = dict(tower_config=tower, checkpoint=checkpoint, select_layer=layer, select_strategy=strategy)
    if modality == "image":
        return OnevisionImageAdapterConfig(
            **common,
            image_grid_pinpoints=config.get("image_grid_pinpoints"),
            vision_aspect_ratio=config.get("vision_aspect_ratio", "anyres_max_9"),
            image_processor=processor,
        )
    return OnevisionVideoAdapterConfig(**common, num_frames=frames, video_processor=processor)


def _save_processor(modality: str, src: Path, out: Path) -> None:
    """The folder's image (or video) processor, as the adapter's preprocessing."""
    if modality == "image":
        from transformers import AutoImageProcessor as Auto
    else:
        from transformers import AutoVideoProcessor as Auto
    Auto.from_pretrained(str(src), trust_remote_code=False).save_pretrained(out)


def _chat_template(tokenizer, src: Path) -> str | None:
    """The folder's chat template: its tokenizer's, else its processor's (chat_template.jinja/.json)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text(encoding="utf-8")
    if (src / "chat_template.json").is_file():
        return read_json(src / "chat_template.json", "chat template").get("chat_template")
    return None


def _template(name: str | None, arch: str, tokenizer, folder_template: str | None, source: str) -> str:
    """The conversation template the imported model uses (see the module docstring)."""
    from mcomp.conversation import CHAT, ChatTemplate

    name = name or (CHAT if arch == ONEVISION else "vicuna_v1")
    if name == CHAT:
        if not folder_template:
            raise ValueError(f"{source}: template 'chat' asked for, but the folder has no chat template")
        tokenizer.chat_template = folder_template
        try:
            ChatTemplate(tokenizer)
        except ValueError as err:
            raise ValueError(f"{source}: the folder's chat template cannot be used: {err}") from None
    return name


def import_llava_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike,
    max_relative_delta: float = 0.5,
    max_shard_size: str | int = "5GB",
    template: str | None = None,
    num_frames: int = 32,
    overwrite: bool = False,
    record: OutputRecord | None = None,
) -> Path:
    """Convert the transformers LLaVA folder `src` into the mcomp model directory `out` (see the module
    docstring); returns `out`. `num_frames`: the frames a OneVision video adapter samples. `record`
    (`mcomp.output_record.OutputRecord`): the recipe and model card written with it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcomp.tokenization import save_tokenizer

    src, base = Path(src), Path(base)
    config = read_json(src / "config.json", "LLaVA config")
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ValueError(f"{src}/config.json: architecture {arch!r}; `mcomp import llava-hf` reads {list(SUPPORTED)}")
    modalities, tower_prefix = SUPPORTED[arch]
    text = dict(config.get("text_config") or {})
    base_config = read_json(base / "config.json", "base LLM config")
    check_architecture(text, base_config, f"{src}/config.json")
    vocab = int(base_config["vocab_size"])
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"{src}/config.json: vision_feature_select_strategy {strategy!r} (default or full)")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"{src}/config.json: vision_feature_layer {layer!r}: several feature layers are not supported")

    folder = SafetensorsCheckpoint(src, name=str(src))
    base_src = SafetensorsCheckpoint(base, name=str(base))
    try:
        parts = split_keys(list(folder.infos), str(src))
        llm_keys = parts["llm"]
        base_keys = set(base_src.infos)
        if base_config.get("tie_word_embeddings"):
            llm_keys.pop("lm_head.weight", None)
        missing, extra = sorted(base_keys - set(llm_keys)), sorted(set(llm_keys) - base_keys)
        if missing or extra:
            raise ValueError(
                f"{src}: the language model's tensors are not the base's (missing {missing[:3]}, extra {extra[:3]})"
            )
        folder_vocab = int(text.get("vocab_size") or folder.infos[llm_keys["model.embed_tokens.weight"]].shape[0])
        tokenizer = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
        base_tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=False)
        _check_tokenizer(tokenizer, base_tokenizer, str(src))
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= vocab:
            tokenizer.pad_token = tokenizer.unk_token  # an added id has no embedding row in mcomp's LLM
        folder_template = _chat_template(tokenizer, src)
        template = _template(template, arch, tokenizer, folder_template, str(src))

        out = Path(out)
        with atomic_directory(out, overwrite=overwrite, inputs=[src, base]) as tmp:
            delta2, norm2 = 0.0, 0.0
            order = base_src.storage_order()
            layout = []
            for key in order:
                info = folder.infos[llm_keys[key]]
                shape = (min(info.shape[0], vocab), *info.shape[1:]) if key in VOCAB_ROWS else info.shape
                if tuple(shape) != tuple(base_src.infos[key].shape):
                    raise ValueError(
                        f"{src}: tensor {llm_keys[key]} has shape {list(info.shape)}, the base's {key} "
                        f"{list(base_src.infos[key].shape)}"
                    )
                layout.append((key, TensorInfo(tuple(shape), info.dtype)))
            (tmp / LLM_DIR).mkdir()
            writer = ShardedWriter(tmp / LLM_DIR, layout, parse_size(max_shard_size), origin=str(src))
            try:
                for key, info in layout:
                    tensor = folder.read(llm_keys[key], 0, info.numel)
                    b = base_src.read(key, 0, info.numel).float()
                    delta2 += float((tensor.float() - b).pow(2).sum())
                    norm2 += float(b.pow(2).sum())
                    writer.write(key, tensor)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            relative = math.sqrt(delta2 / norm2) if norm2 > 0 else math.inf
            if not relative <= max_relative_delta:
                raise ValueError(
                    f"{src}: its language model differs from the base {base} by {relative:.3f} of the base's norm "
                    f"(‖W_ft − W_base‖ / ‖W_base‖ > {max_relative_delta}): it was evidently not fine-tuned from "
                    f"this base"
                )
            for name in ("config.json", "generation_config.json"):
                if (base / name).is_file():
                    (tmp / LLM_DIR / name).write_bytes((base / name).read_bytes())

            tower_state = _read_part(folder, parts[tower_prefix])
            if arch == ONEVISION:  # the tower in transformers' own layout
                tower_config = {
                    k: v for k, v in dict(config.get("vision_config") or {}).items() if k not in TOWER_CONFIG_EXTRAS
                }
            else:
                vision = hf_vision_config(dict(config.get("vision_config") or {}), f"{src}/config.json: vision_config")
                tower_state, tower_config = convert_hf_state_dict(tower_state, vision, f"{src} (vision tower)")
            encoder_file = ENCODER_FILE.format(modality=modalities[0])
            (tmp / encoder_file).parent.mkdir(parents=True)
            save_tensors(tower_state, tmp / encoder_file, metadata={"format": "pt", "source": str(src.resolve())})
            adapters = []
            for modality in modalities:
                _save_processor(modality, src, tmp / PROCESSOR_DIR)
                where = (tower_config, encoder_file, PROCESSOR_DIR, layer, strategy)  # relative to the model
                adapters.append(
                    _onevision_adapter_config(modality, config, *where, num_frames)
                    if arch == ONEVISION
                    else _adapter_config(modality, config, *where)
                )
            act = config.get("projector_hidden_act", "gelu")
            projector = _projector(_read_part(folder, parts["projector"]), act, arch == ONEVISION, str(src))
            save_tensors(
                {f"{m}.{k}": v.clone() for m in modalities for k, v in projector.items()},
                tmp / "projectors.safetensors",
            )
            save_tokenizer(tokenizer, tmp)
            base_llm = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto", trust_remote_code=False)
            MLLMConfig(
                mcomp_version=__version__,
                base_model=str(base.resolve()),
                base_model_sha256=base_weights_sha256(base_llm),
                base_model_config={
                    "model_type": base_config.get("model_type"),
                    "hidden_size": base_config.get("hidden_size"),
                    "num_hidden_layers": base_config.get("num_hidden_layers"),
                    "vocab_size": vocab,
                },
                template=template,
                adapters=[a.to_dict() for a in adapters],
                llm=LLM_DIR,
                llm_sha256=llm_files_sha256(tmp / LLM_DIR),
                provenance={
                    "import": {
                        "source": str(src.resolve()),
                        "format": "llava-hf",
                        "architecture": arch,
                        "relative_delta": round(relative, 6),
                        "vocabulary_rows_dropped": list(range(vocab, folder_vocab)),
                        "chat_template": folder_template,
                    }
                },
            ).to_json_file(tmp / CONFIG_NAME)
            del base_llm
            if record is not None:
                record.write(
                    tmp,
                    {
                        "architecture": arch,
                        "relative delta to the base": round(relative, 6),
                        "vocabulary rows dropped": folder_vocab - vocab,
                    },
                )
    finally:
        folder.close()
        base_src.close()
    logger.info("imported %s (%s, relative delta %.4f) -> %s", src, arch, relative, out)
    return out
