"""A depth modality for mcomp, in one module: the adapter (an RGB-D array in a .npy file, encoded
by a small patch encoder) and how the demo's synthetic world renders it."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from mcomp import AdapterConfig, ModalityAdapter
from mcomp.errors import MediaError
from mcomp.io import load_tensors
from mcomp.world.renderers import Scene


@dataclasses.dataclass
class DepthConfig(AdapterConfig):
    adapter: str = "depth"
    projector_type: str = "linear"
    size: int = 16  # pixels per side
    patch: int = 4  # pixels per patch side: (size / patch)^2 tokens
    dim: int = 24
    checkpoint: str | None = None  # encoder weights (safetensors), e.g. the zoo's pretrained encoder


class DepthAdapter(ModalityAdapter):
    modality = "depth"
    placeholder = "<depth>"
    config_class = DepthConfig

    def build_encoder(self) -> nn.Module:
        cfg = self.config
        encoder = nn.Sequential(nn.Conv2d(4, cfg.dim, cfg.patch, stride=cfg.patch), nn.GELU())
        if cfg.checkpoint:
            encoder.load_state_dict(load_tensors(cfg.checkpoint))
        return encoder

    @property
    def encoder_dim(self) -> int:
        return self.config.dim

    @property
    def num_tokens(self) -> int:
        return (self.config.size // self.config.patch) ** 2

    def load(self, path: str) -> np.ndarray:
        array = np.load(path, allow_pickle=False)
        size = self.config.size
        if array.shape != (4, size, size):
            raise MediaError(path, f"expected an RGB-D array of shape (4, {size}, {size}), got {array.shape}")
        return array

    def preprocess(self, raw: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(raw, dtype=np.float32))

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        features = self.encoder[0].weight
        return self.encoder(batch.to(features.dtype)).flatten(2).transpose(1, 2)


def render_depth(scene: Scene, path: str) -> None:
    """The entity's image render (its colour) and a depth channel: near where the object is."""
    from mcomp.world.render_image import render_image

    size = int(scene.settings["size"])
    pixels, _ = render_image(scene.entity, scene.rgb, scene.rng, size * 2)
    rgb = pixels.reshape(size, 2, size, 2, 3).mean(axis=(1, 3)) / 255.0
    background = np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0)
    depth = 1.0 - np.clip(np.abs(rgb - background).sum(-1) * 4.0, 0.0, 1.0)
    np.save(path, np.concatenate([rgb.transpose(2, 0, 1), depth[None]]).astype(np.float16))
