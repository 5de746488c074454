"""A transformers vision tower (SigLIP, CLIP, ...) built from its config and a local weights file, returning the
hidden states of a chosen layer as the LLaVA family reads them (`hidden_states[layer]`)."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class TransformersVisionTower(nn.Module):
    """`AutoModel` of a vision config (`model_type` e.g. "siglip_vision_model"), randomly initialised or
    loaded from `checkpoint`, a safetensors state dict in the model's own key names. Never downloads."""

    def __init__(self, config: dict[str, Any], checkpoint: str | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        fields = copy.deepcopy(config)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ValueError(f"vision tower config has no model_type: {sorted(config)}")
        self.config = AutoConfig.for_model(model_type, **fields)
        self.model = AutoModel.from_config(self.config)
        self.image_size = int(self.config.image_size)
        self.patch_size = int(self.config.patch_size)
        self.width = int(self.config.hidden_size)
        self.layers = int(self.config.num_hidden_layers)
        if checkpoint:
            self.load_checkpoint(checkpoint)

    @property
    def grid(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size

    def load_checkpoint(self, path: str) -> None:
        from mcomp.io import check_state_dict, load_tensors

        state = load_tensors(path)
        check_state_dict(self.model.state_dict(), state, path, "vision tower")
        self.model.load_state_dict(state, strict=True)
        logger.info("loaded vision tower weights from %s", path)

    def forward(self, pixels: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """[B, tokens, width]: `hidden_states[layer]` (0 = the embeddings, -1 = the last block's output)."""
        if not -self.layers - 1 <= layer <= self.layers:
            raise ValueError(f"feature layer {layer} is out of range for a {self.layers}-layer tower")
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixels.to(dtype), output_hidden_states=True, return_dict=True)
        return out.hidden_states[layer]
