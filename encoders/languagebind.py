"""LanguageBind video tower (`LanguageBind_Video_merge`) as a video encoder option of mcomp.

The published video MLLM encodes 8 frames with LanguageBind's video `vision_model`: a CLIP ViT-L/14 at
224 px in which every encoder layer first attends over *time* (each patch position across the frames)
and then over space (the usual CLIP layer). Written for mcomp from the published structure; module and
parameter names follow the released transformers checkpoint (`vision_model.*`), so its weights load
strictly:

    frames [B*T, 3, S, S] --patch_embedding (conv, no bias), class_embedding, position_embedding-->
    pre_layrnorm --> L x layer --> hidden_states (hidden_states[0] = embeddings, [i] = output of layer i)

    layer (add_time_attn):  x[(b t), n, d] -> x[(b n), t, d] + temporal_embedding[:, :t]
                            x = x + temporal_attn(temporal_layer_norm1(x))         (over the T frames)
                            x = x + self_attn(layer_norm1(x))                      (over the n tokens)
                            x = x + mlp(layer_norm2(x))                            (fc1, act, fc2)

Per layer: `temporal_embedding` [1, T, D], `temporal_attn.{q,k,v,out}_proj.{weight,bias}`,
`temporal_layer_norm1.{weight,bias}`, plus the CLIP layer's `self_attn.*`, `layer_norm1/2.*`,
`mlp.fc1/fc2.*`. The features are `hidden_states[select_layer]` ([-2] published) with CLS kept:
[B, T * (1 + patches), D], frame-major.

Assumptions (not verifiable here without the upstream files; see docs/published_models.md):
* The `vl` embedding (2-D patch conv applied per frame) is used; a config with `clip_type: vl_new`
  (3-D tube embedding) is refused rather than guessed.
* PatchDropout is a training-time operation (inactive in eval), so it is not modelled.
* `temporal_embedding` is added only when T != 1, as upstream; T is the config's `num_frames`.
* Attention masks are None for the vision tower (no padding inside a frame).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mcomp.encoders.video import VideoAdapter, VideoAdapterConfig
from mcomp.encoders.weights import read_hf_weights, read_json
from mcomp.io import check_state_dict, load_tensors
from mcomp.modality import register_modality

logger = logging.getLogger(__name__)

ADAPTER_NAME = "video_languagebind"
PREFIX = "vision_model."
# Fields of the LanguageBind vision config that shape the tower (the rest is training/text only).
TOWER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
    "add_time_attn",
    "num_frames",
)
TOWER_DEFAULTS = {  # transformers CLIPVisionConfig defaults, plus LanguageBind's video fields
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "add_time_attn": True,
    "num_frames": 8,
}
_ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": None}


def tower_config_from_hf(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The tower fields of a LanguageBind video config.json (`vision_config`), defaults filled."""
    vision = config.get("vision_config", config)
    if not isinstance(vision, dict):
        raise ValueError(f"{source}: vision_config must be an object")
    if vision.get("clip_type", "vl") == "vl_new":
        raise ValueError(
            f"{source}: clip_type 'vl_new' (3-D tube patch embedding) is not supported; "
            f"LanguageBind_Video_merge uses the per-frame ('vl') embedding"
        )
    return {k: vision.get(k, TOWER_DEFAULTS[k]) for k in TOWER_FIELDS}


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """CLIP multi-head attention (q scaled by head_dim^-0.5), names as transformers' CLIPAttention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"LanguageBind tower: hidden_size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = QuickGELU() if act == "quick_gelu" else nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.self_attn = Attention(d, cfg["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(d, eps=eps)
        self.mlp = Mlp(d, cfg["intermediate_size"], cfg["hidden_act"])
        self.layer_norm2 = nn.LayerNorm(d, eps=eps)
        self.add_time_attn = bool(cfg["add_time_attn"])
        self.num_frames = int(cfg["num_frames"])
        if self.add_time_attn:
            self.temporal_embedding = nn.Parameter(torch.randn(1, self.num_frames, d) * d**-0.5)
            self.temporal_attn = Attention(d, cfg["num_attention_heads"])
            self.temporal_layer_norm1 = nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """x [(b t), n, d]: t frames per clip (1 for a still image: no temporal embedding, and the
        temporal attention sees one frame, as the released layer does when fewer frames than
        `num_frames` come in)."""
        if self.add_time_attn:
            bt, n, d = x.shape
            x = x.view(bt // t, t, n, d).transpose(1, 2).reshape(-1, t, d)  # (b t) n d -> (b n) t d
            if t != 1:
                x = x + self.temporal_embedding[:, :t].to(x.dtype)
            x = x + self.temporal_attn(self.temporal_layer_norm1(x))
            x = x.view(bt // t, n, t, d).transpose(1, 2).reshape(bt, n, d)  # back to (b t) n d
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        d, p = cfg["hidden_size"], cfg["patch_size"]
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.patch_embedding = nn.Conv2d(cfg["num_channels"], d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((cfg["image_size"] // p) ** 2 + 1, d)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)[None]


class VisionTransformer(nn.Module):
    """LanguageBind's video `vision_model` (inference only)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.post_layernorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])


class LanguageBindVideoTower(nn.Module):
    """Frames -> tokens of one hidden state, with the attributes the video adapter uses."""

    def __init__(self, tower_config: dict[str, Any], checkpoint: str | None = None):
        super().__init__()
        unknown = sorted(set(tower_config) - set(TOWER_FIELDS))
        if unknown:
            raise ValueError(f"LanguageBind tower_config: unknown field(s) {unknown}; known: {list(TOWER_FIELDS)}")
        cfg = {**TOWER_DEFAULTS, **tower_config}
        if cfg["hidden_act"] not in _ACTIVATIONS:
            raise ValueError(
                f"LanguageBind tower: hidden_act {cfg['hidden_act']!r} not supported "
                f"(expected one of {sorted(_ACTIVATIONS)})"
            )
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)
        self.image_size = int(cfg["image_size"])
        self.patch_size = int(cfg["patch_size"])
        self.width = int(cfg["hidden_size"])
        self.layers = int(cfg["num_hidden_layers"])
        self.num_frames = int(cfg["num_frames"])
        if checkpoint:
            self.load_checkpoint(checkpoint)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Strict load from a LanguageBind directory (config.json + weights) or a weight file with
        `vision_model.*` keys (text tower, projections and `logit_scale` are ignored)."""
        path = Path(path)
        if path.is_dir():
            file_cfg = tower_config_from_hf(read_json(path / "config.json", "LanguageBind config"), str(path))
            differs = {k: (file_cfg[k], self.config[k]) for k in TOWER_FIELDS if file_cfg[k] != self.config[k]}
            if differs:
                raise ValueError(
                    f"{path}/config.json does not match the adapter's tower_config (field: file vs adapter): {differs}"
                )
            state = read_hf_weights(path, keep=[PREFIX])
        else:
            state = {k: v for k, v in load_tensors(path).items() if k.startswith(PREFIX)}
        state = {k: v for k, v in state.items() if k != PREFIX + "embeddings.position_ids"}  # old buffer
        lora = sorted(k for k in state if "lora_" in k)
        if lora:
            raise ValueError(f"{path}: holds unmerged LoRA weights ({lora[0]}, ...); use LanguageBind_Video_merge")
        expected = {PREFIX + k: tuple(v.shape) for k, v in self.vision_model.state_dict().items()}
        check_state_dict(expected, state, path, "LanguageBind video tower")
        self.vision_model.load_state_dict({k[len(PREFIX) :]: v for k, v in state.items()}, strict=True)
        logger.info("loaded LanguageBind video tower from %s", path)

    def forward(self, frames: torch.Tensor, num_frames: int, select_layer: int = -2) -> torch.Tensor:
        """frames [B*T, 3, S, S] (frame-major per clip) -> hidden_states[select_layer] [B*T, 1 + P, D].

        Indexing as transformers' `hidden_states`: 0 = embeddings, i = output of layer i, -1 = last.
        """
        if self.vision_model.encoder.layers[0].add_time_attn and num_frames not in (1, self.num_frames):
            raise ValueError(
                f"LanguageBind tower expects {self.num_frames} frames per clip (or 1, a still image), got {num_frames}"
            )
        index = self.layers + 1 + select_layer if select_layer < 0 else select_layer
        if not 0 <= index <= self.layers:
            raise ValueError(f"select_layer {select_layer} is out of range for a {self.layers}-layer tower")
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(frames))
        for layer in vm.encoder.layers[:index]:
            x = layer(x, num_frames)
        return x


@dataclasses.dataclass
class LanguageBindVideoAdapterConfig(VideoAdapterConfig):
    adapter: str = ADAPTER_NAME
    tower: str = "LanguageBind_Video_merge"
    # the tower fields (TOWER_FIELDS); None: read from `checkpoint`/config.json (a directory)
    tower_config: dict[str, Any] | None = None
    checkpoint: str | None = None  # LanguageBind directory or a weight file with vision_model.* keys


@register_modality(ADAPTER_NAME)
class LanguageBindVideoAdapter(VideoAdapter):
    """The video adapter with LanguageBind's temporal-attention tower (frames encoded jointly)."""

    config_class = LanguageBindVideoAdapterConfig

    def build_encoder(self) -> LanguageBindVideoTower:
        cfg: LanguageBindVideoAdapterConfig = self.config
        tower_config = cfg.tower_config
        if tower_config is None:
            if not (cfg.checkpoint and Path(cfg.checkpoint).is_dir()):
                raise ValueError(
                    "video_languagebind adapter: give tower_config, or a LanguageBind directory as checkpoint"
                )
            tower_config = tower_config_from_hf(
                read_json(Path(cfg.checkpoint) / "config.json", "LanguageBind config"), cfg.checkpoint
            )
        tower = LanguageBindVideoTower(tower_config, cfg.checkpoint)
        if (
            tower.vision_model.encoder.layers
            and tower.vision_model.encoder.layers[0].add_time_attn
            and cfg.num_frames != tower.num_frames
        ):
            raise ValueError(
                f"video_languagebind adapter: num_frames {cfg.num_frames} differs from the tower's "
                f"{tower.num_frames} (its temporal attention is built for that many frames)"
            )
        grid = tower.image_size // tower.patch_size
        if cfg.pool == "space" and grid % cfg.pool_size:
            raise ValueError(f"pool_size {cfg.pool_size} must divide the {grid}x{grid} patch grid for space pooling")
        return tower

    def frame_tokens(self, batch: torch.Tensor) -> torch.Tensor:
        """The frames go through the tower together: its temporal attention mixes them."""
        b, t = batch.shape[:2]
        tokens = self.encoder(batch.flatten(0, 1), t, self.config.select_layer)
        return tokens.view(b, t, tokens.shape[1], tokens.shape[2])
