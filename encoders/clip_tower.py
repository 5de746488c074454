"""An open_clip vision tower that returns the tokens of a chosen layer (shared by image and video)."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def open_clip_model_config(tower: str, tower_config: dict[str, Any] | None) -> dict[str, Any]:
    """The open_clip model config: inline (`tower_config`) or by open_clip model name."""
    import open_clip

    if tower_config is not None:
        return copy.deepcopy(tower_config)
    cfg = open_clip.get_model_config(tower)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {tower!r}; give tower_config or one of open_clip.list_models()")
    return cfg


class ClipVisionTower(nn.Module):
    """The vision half of an open_clip model, randomly initialised or loaded from a local file.

    Never downloads: `checkpoint` is a path to a safetensors (or weights-only pickle) state dict of
    either the whole open_clip model (`visual.*` keys are taken) or of the visual tower alone.
    """

    def __init__(self, tower: str, tower_config: dict[str, Any] | None = None, checkpoint: str | None = None):
        super().__init__()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        cfg = open_clip_model_config(tower, tower_config)
        quick_gelu = bool(cfg.get("quick_gelu", False)) or tower.endswith("-quickgelu")
        vision_cfg = CLIPVisionCfg(**cfg["vision_cfg"])
        self.visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu)
        self.image_size = (
            int(vision_cfg.image_size)
            if not isinstance(vision_cfg.image_size, (tuple, list))
            else int(vision_cfg.image_size[0])
        )
        self.patch_size = int(vision_cfg.patch_size)
        self.width = int(vision_cfg.width)
        self.layers = int(vision_cfg.layers)
        if checkpoint:
            self.load_checkpoint(checkpoint)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def load_checkpoint(self, path: str) -> None:
        from mcomp.io import check_state_dict, load_tensors

        state = load_tensors(path)
        if isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        check_state_dict(self.visual.state_dict(), state, path, "vision tower")
        self.visual.load_state_dict(state, strict=True)
        logger.info("loaded vision tower weights from %s", path)

    def forward(self, pixels: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
        """Tokens [B, 1 + patches, width] (CLS first) output by block `select_layer`.

        Layer indexing follows transformers' `hidden_states`: -1 is the last block's output, -2 the
        one before it (the published choice); 0 would be the embeddings, which is not supported.
        """
        index = self.layers + select_layer if select_layer < 0 else select_layer - 1
        if not 0 <= index < self.layers:
            raise ValueError(f"select_layer {select_layer} is out of range for a {self.layers}-layer tower")
        dtype = self.visual.conv1.weight.dtype
        out = self.visual.forward_intermediates(
            pixels.to(dtype),
            indices=[index],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        cls = out["image_intermediates_prefix"][0]
        patches = out["image_intermediates"][0]
        return torch.cat([cls, patches], dim=1)
