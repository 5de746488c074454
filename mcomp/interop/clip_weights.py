"""CLIP vision weights from OpenAI's and transformers' layouts into mcomp's open_clip tower.

mcomp's image and video adapters run an open_clip `VisionTransformer` (`mcomp.encoders.clip_tower`).
Two public layouts of the same ViT are converted to its state dict, strictly:

* OpenAI CLIP state dict (the weights of `ViT-L-14-336px.pt` as a plain state dict): `visual.conv1.weight`,
  `visual.transformer.resblocks.<i>.attn.in_proj_weight`, ... These are open_clip's own names under
  `visual.`; text-tower keys and the `input_resolution`/`context_length`/`vocab_size` entries are ignored.
  Heads are not stored in the file: OpenAI's ViTs use 64-wide heads, so heads = width / 64.
  The TorchScript archive OpenAI distributes is *not* a state dict and is refused (it cannot be read
  without unpickling code objects); export its state dict in a trusted environment first, or use the
  transformers directory (`openai/clip-vit-large-patch14-336`), which is what the released configs name.
* transformers `CLIPVisionModel` / `CLIPModel` directory (config.json + weights):
  `[vision_model.]embeddings.patch_embedding.weight`, `...encoder.layers.<i>.self_attn.q_proj.weight`, ...
  q/k/v are concatenated into open_clip's `in_proj_weight`; `visual_projection.weight` (CLIPModel only)
  becomes `proj` (transposed). A bare `CLIPVisionModel` has no projection: `proj` is then zero-filled
  (mcomp takes features from an intermediate layer, before `ln_post` and `proj`, so it is never used).

Every source tensor must be consumed and every tower tensor provided, with matching shapes; a
mismatch raises ValueError naming the keys.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from mcomp.encoders.weights import read_hf_weights, read_json
from mcomp.io import check_state_dict, load_tensors, save_tensors

logger = logging.getLogger(__name__)

OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
OPENAI_HEAD_WIDTH = 64
HF_PREFIX = "vision_model."
HF_IGNORED_PREFIXES = ("text_model.", "text_projection.", "logit_scale")


# --- open_clip side ---------------------------------------------------------------------------
def open_clip_tower_config(
    width: int,
    layers: int,
    heads: int,
    patch_size: int,
    image_size: int,
    mlp_dim: int,
    embed_dim: int,
    quick_gelu: bool,
) -> dict[str, Any]:
    """An inline open_clip model config (the `tower_config` field of the image/video adapters)."""
    if width % heads:
        raise ValueError(f"CLIP vision width {width} is not divisible by {heads} heads")
    return {
        "embed_dim": int(embed_dim),
        "quick_gelu": bool(quick_gelu),
        "vision_cfg": {
            "image_size": int(image_size),
            "layers": int(layers),
            "width": int(width),
            "head_width": int(width // heads),
            "mlp_ratio": mlp_dim / width,
            "patch_size": int(patch_size),
        },
    }


def expected_tower_shapes(tower_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the open_clip visual tower for `tower_config` (built on the meta device)."""
    from mcomp.encoders.clip_tower import ClipVisionTower

    with torch.device("meta"):
        tower = ClipVisionTower("custom", tower_config)
    return {k: tuple(v.shape) for k, v in tower.visual.state_dict().items()}


# --- OpenAI layout ----------------------------------------------------------------------------
def convert_openai_state_dict(state: dict[str, Any], source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(open_clip visual state dict, tower_config) from an OpenAI CLIP state dict."""
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"{source}: no 'visual.*' tensors: not an OpenAI/open_clip CLIP state dict")
    for key in ("conv1.weight", "positional_embedding", "proj"):
        if key not in visual:
            raise ValueError(f"{source}: missing tensor 'visual.{key}' (a ViT CLIP state dict has it)")
    conv = visual["conv1.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    layers = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
    grid = round((visual["positional_embedding"].shape[0] - 1) ** 0.5)
    mlp_key = "transformer.resblocks.0.mlp.c_fc.weight"
    if mlp_key not in visual:
        raise ValueError(f"{source}: missing tensor 'visual.{mlp_key}'")
    cfg = open_clip_tower_config(
        width=width,
        layers=layers,
        heads=max(1, width // OPENAI_HEAD_WIDTH),
        patch_size=patch,
        image_size=patch * grid,
        mlp_dim=int(visual[mlp_key].shape[0]),
        embed_dim=int(visual["proj"].shape[1]),
        quick_gelu=True,  # every OpenAI CLIP uses QuickGELU
    )
    visual = {k: v for k, v in visual.items() if isinstance(v, torch.Tensor)}
    expected = {f"visual.{k}": s for k, s in expected_tower_shapes(cfg).items()}
    check_state_dict(
        expected, {f"visual.{k}": v for k, v in visual.items()}, source, "CLIP vision tower (OpenAI layout)"
    )
    return visual, cfg


# --- transformers layout ----------------------------------------------------------------------
def hf_vision_config(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The vision fields of a transformers CLIP config (CLIPModel or CLIPVisionModel), defaults filled."""
    from transformers import CLIPVisionConfig

    fields = config.get("vision_config", config) if config.get("model_type") != "clip_vision_model" else config
    if not isinstance(fields, dict):
        raise ValueError(f"{source}: vision_config must be an object")
    known = CLIPVisionConfig().to_dict()
    merged = {k: fields.get(k, v) for k, v in known.items()}
    return merged


def convert_hf_state_dict(
    state: dict[str, torch.Tensor], vision: dict[str, Any], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(open_clip visual state dict, tower_config) from transformers CLIP vision weights."""
    prefix = HF_PREFIX if any(k.startswith(HF_PREFIX) for k in state) else ""
    if prefix:
        body = {k[len(HF_PREFIX) :]: v for k, v in state.items() if k.startswith(HF_PREFIX)}
        rest = {k: v for k, v in state.items() if not k.startswith(HF_PREFIX)}
    else:
        known_roots = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
        body = {k: v for k, v in state.items() if k.startswith(known_roots)}
        rest = {k: v for k, v in state.items() if not k.startswith(known_roots)}
    projection = rest.pop("visual_projection.weight", None)
    ignored = sorted(k for k in rest if k.startswith(HF_IGNORED_PREFIXES))
    if ignored:
        logger.debug("%s: ignoring %d text-tower tensors", source, len(ignored))
    stray = sorted(k for k in rest if not k.startswith(HF_IGNORED_PREFIXES))
    body.pop("embeddings.position_ids", None)  # a buffer older transformers saved

    width, heads = int(vision["hidden_size"]), int(vision["num_attention_heads"])
    layers = int(vision["num_hidden_layers"])
    act = vision.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"{source}: hidden_act {act!r} is not supported by the open_clip tower (quick_gelu or gelu)")
    embed_dim = int(projection.shape[0]) if projection is not None else int(vision.get("projection_dim") or width)
    cfg = open_clip_tower_config(
        width=width,
        layers=layers,
        heads=heads,
        patch_size=int(vision["patch_size"]),
        image_size=int(vision["image_size"]),
        mlp_dim=int(vision["intermediate_size"]),
        embed_dim=embed_dim,
        quick_gelu=act == "quick_gelu",
    )

    # The transformers names this conversion consumes, so that leftovers are reported by name.
    expected_hf: dict[str, tuple[int, ...]] = {
        "embeddings.class_embedding": (width,),
        "embeddings.patch_embedding.weight": (
            width,
            int(vision.get("num_channels", 3)),
            int(vision["patch_size"]),
            int(vision["patch_size"]),
        ),
        "embeddings.position_embedding.weight": (
            (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1,
            width,
        ),
        "pre_layrnorm.weight": (width,),
        "pre_layrnorm.bias": (width,),
        "post_layernorm.weight": (width,),
        "post_layernorm.bias": (width,),
    }
    mlp = int(vision["intermediate_size"])
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected_hf[f"{p}self_attn.{proj}.weight"] = (width, width)
            expected_hf[f"{p}self_attn.{proj}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            expected_hf[f"{p}{norm}.weight"] = (width,)
            expected_hf[f"{p}{norm}.bias"] = (width,)
        expected_hf[f"{p}mlp.fc1.weight"], expected_hf[f"{p}mlp.fc1.bias"] = (mlp, width), (mlp,)
        expected_hf[f"{p}mlp.fc2.weight"], expected_hf[f"{p}mlp.fc2.bias"] = (width, mlp), (width,)
    check_state_dict(
        {prefix + k: v for k, v in expected_hf.items()},
        {**{prefix + k: v for k, v in body.items()}, **{k: rest[k] for k in stray}},
        source,
        "CLIP vision (transformers layout)",
    )

    out = {
        "class_embedding": body["embeddings.class_embedding"],
        "conv1.weight": body["embeddings.patch_embedding.weight"],
        "positional_embedding": body["embeddings.position_embedding.weight"],
        "ln_pre.weight": body["pre_layrnorm.weight"],
        "ln_pre.bias": body["pre_layrnorm.bias"],
        "ln_post.weight": body["post_layernorm.weight"],
        "ln_post.bias": body["post_layernorm.bias"],
    }
    for i in range(layers):
        s, d = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[f"{d}attn.in_proj_weight"] = torch.cat([body[f"{s}self_attn.{n}_proj.weight"] for n in "qkv"])
        out[f"{d}attn.in_proj_bias"] = torch.cat([body[f"{s}self_attn.{n}_proj.bias"] for n in "qkv"])
        for src, dst in (
            ("self_attn.out_proj", "attn.out_proj"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ):
            out[f"{d}{dst}.weight"] = body[f"{s}{src}.weight"]
            out[f"{d}{dst}.bias"] = body[f"{s}{src}.bias"]
    if projection is not None:
        out["proj"] = projection.t().contiguous()
    else:
        logger.info(
            "%s: no visual_projection (a CLIPVisionModel); open_clip 'proj' is zero-filled "
            "(unused: mcomp reads an intermediate layer)",
            source,
        )
        out["proj"] = torch.zeros(width, embed_dim, dtype=out["conv1.weight"].dtype)
    check_state_dict(expected_tower_shapes(cfg), out, source, "CLIP vision tower (converted)")
    return out, cfg


# --- entry points -----------------------------------------------------------------------------
def read_clip_vision(src: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(open_clip visual state dict, tower_config, layout name) from a transformers CLIP directory or an
    OpenAI/open_clip state-dict file (.pt/.bin pickles only through weights_only, or .safetensors)."""
    src = Path(src)
    if src.is_dir():
        config = read_json(src / "config.json", "transformers CLIP config")
        vision = hf_vision_config(config, str(src / "config.json"))
        state = read_hf_weights(src)
        state, cfg = convert_hf_state_dict(state, vision, str(src))
        return state, cfg, "transformers"
    if not src.is_file():
        raise FileNotFoundError(f"CLIP weights not found: {src}")
    try:
        state = load_tensors(src)
    except ValueError as err:
        raise ValueError(
            f"{err}. If this is OpenAI's TorchScript archive, use the transformers directory "
            f"(openai/clip-vit-large-patch14-336) or a plain state dict instead"
        ) from None
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    dropped = [k for k in OPENAI_META_KEYS if k in state]
    state = {k: v for k, v in state.items() if k not in OPENAI_META_KEYS}
    if dropped:
        logger.debug("%s: ignoring OpenAI metadata entries %s", src, dropped)
    if any(k.startswith(("vision_model.", "embeddings.patch_embedding")) for k in state):
        raise ValueError(
            f"{src}: transformers-layout CLIP weights need their config: pass the model directory "
            f"(config.json + weights), not the weight file"
        )
    state, cfg = convert_openai_state_dict(state, str(src))
    return state, cfg, "openai"


def write_open_clip_tower(src: str | os.PathLike, out_file: str | os.PathLike) -> dict[str, Any]:
    """Convert `src` (see `read_clip_vision`) into an open_clip visual-tower safetensors file; returns the
    tower_config to put in the adapter config next to `checkpoint=out_file`."""
    state, cfg, layout = read_clip_vision(src)
    save_tensors(state, out_file, metadata={"format": "pt", "source": os.path.abspath(src), "layout": layout})
    logger.info("converted CLIP vision weights %s (%s layout) -> %s", src, layout, out_file)
    return cfg
