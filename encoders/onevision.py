"""LLaVA-OneVision's image and video adapters, as transformers' LlavaOnevisionForConditionalGeneration computes
them (`mcomp import llava-hf` of a LLaVA-OneVision folder builds both).

Images ("anyres"): the image processor resizes and pads the image to the best of `image_grid_pinpoints`,
cuts it into tiles of the tower's size and puts a resized copy of the whole image first. Every tile goes
through the tower (`hidden_states[select_layer]`) and the projector; the tiles' features are laid out as
the image's patch grid, the padding is cut off again, the grid is shrunk bilinearly when it holds more
than about `anyres_max_N` tiles' worth of patches, and a learned `image_newline` ends every row. The
whole image's features come first. The token count therefore depends on the image's size.

Videos: each sampled frame goes through the tower and the projector, the frame's patch grid is shrunk
bilinearly to half its side (rounded up), and one `image_newline` ends the clip.

The packing runs after the projector (the bilinear steps do not commute with it), so the features an
image's encoder gives carry the image's size: their first row holds (height, width), the rest are the
tiles' tower features (`ANYRES_SIZE_ROW`). The preprocessed input carries it the same way, as a last
tile holding (height, width) in its first two values, so both the feature cache and a caller holding
preprocessed tensors keep it with the pixels. Several images in one prompt are each tiled, as
transformers does without `batch_num_images` (given it, transformers keeps only the whole-image tile of
each image of a multi-image sample; an adapter does not see how many images its sample has).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mcomp.encoders.hf_vision_tower import TransformersVisionTower
from mcomp.encoders.image import check_image_size, load_image
from mcomp.encoders.video import is_clip_tensor, read_video_frames, sampled_frames
from mcomp.errors import MediaError
from mcomp.modalities import MODALITIES
from mcomp.modality import AdapterConfig, ModalityAdapter, register_modality

ANYRES_SIZE_ROW = 0  # the row of an image's encoder features that holds its (height, width)
STRATEGIES = ("full", "default")  # every token, or the first (CLS) dropped: transformers' names


def best_resolution(size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (height, width) of `pinpoints` that keeps the most of an image of `size` (height, width) when
    it is scaled to fit, the least padding breaking ties (LLaVA-NeXT's `select_best_resolution`)."""
    height, width = size
    best, most, least_waste = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > most or (effective == most and waste < least_waste):
            best, most, least_waste = (int(h), int(w)), effective, waste
    if best is None:
        raise ValueError(f"no grid pinpoint fits an image of {width} x {height} pixels: {list(pinpoints)}")
    return best


def unpadded_size(grid: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) rows and columns of a padded feature grid (rows, cols) that hold the
    image of `size` (height, width): the padding the processor added, centred, is cut off."""
    rows, cols = grid
    height, width = size
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        pad = (rows - new_rows) // 2
        return (pad, rows - pad), (0, cols)
    new_cols = int(round(width * (rows / height), 7))
    pad = (cols - new_cols) // 2
    return (0, rows), (pad, cols - pad)


def max_tiles(vision_aspect_ratio: str) -> int:
    found = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio)
    if not found:
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r}: expected anyres_max_<N>")
    return int(found.group(1))


@dataclasses.dataclass(frozen=True)
class AnyresLayout:
    """How one image's tile features become its token sequence."""

    tiles: tuple[int, int]  # rows, cols of tiles after the whole-image tile
    rows: tuple[int, int]  # the kept rows of the patch grid [start, stop)
    cols: tuple[int, int]
    shrunk: tuple[int, int] | None  # the grid's size after the bilinear shrink, if any

    @property
    def grid(self) -> tuple[int, int]:
        return self.shrunk or (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])


def anyres_layout(
    size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int, patches: int, max_tiles_: int
) -> AnyresLayout:
    """The layout of an image of `size` (height, width): tiles of `tile` pixels, `patches` per side."""
    best_h, best_w = best_resolution(size, pinpoints)
    tiles = (best_h // tile, best_w // tile)
    rows, cols = unpadded_size((tiles[0] * patches, tiles[1] * patches), size)
    height, width = rows[1] - rows[0], cols[1] - cols[0]
    ratio = math.sqrt(height * width / (max_tiles_ * patches**2))
    shrunk = (int(height // ratio), int(width // ratio)) if ratio > 1.1 else None
    return AnyresLayout(tiles, rows, cols, shrunk)


class NewlineProjector(nn.Module):
    """The projector of LLaVA-OneVision: an MLP per token, and the learned `image_newline` the packing puts
    at the end of every row of an image's grid (and of every clip)."""

    def __init__(self, projector_type: str, in_dim: int, out_dim: int):
        super().__init__()
        from mcomp.encoders.projector import build_projector

        self.mlp = build_projector(projector_type, in_dim, out_dim)
        self.image_newline = nn.Parameter(torch.randn(out_dim) / math.sqrt(out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class _OnevisionAdapter(ModalityAdapter):
    """The tower and projector both OneVision adapters share."""

    def build_encoder(self) -> TransformersVisionTower:
        cfg = self.config
        if cfg.select_strategy not in STRATEGIES:
            raise ValueError(f"select_strategy must be one of {STRATEGIES}, got {cfg.select_strategy!r}")
        return TransformersVisionTower(cfg.tower_config, cfg.checkpoint)

    def build_projector(self) -> nn.Module:
        return NewlineProjector(self.config.projector_type, self.encoder_dim, self.llm_hidden_size)

    @property
    def encoder_dim(self) -> int:
        return self.encoder.width

    def tower_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, tokens, width]: the selected layer, the CLS token dropped under "default"."""
        tokens = self.encoder(pixels.to(self.device), self.config.select_layer)
        return tokens[:, 1:] if self.config.select_strategy == "default" else tokens

    def _grid_side(self, tokens: int) -> int:
        side = self.encoder.grid
        if side * side != tokens:
            raise ValueError(
                f"{self.config.adapter}: {tokens} tokens per tile are not the tower's {side} x {side} patch grid "
                f"(select_strategy {self.config.select_strategy!r})"
            )
        return side


@dataclasses.dataclass
class OnevisionImageAdapterConfig(AdapterConfig):
    adapter: str = "llava_onevision_image"
    tower_config: dict[str, Any] | None = None  # the transformers vision config (model_type included)
    checkpoint: str | None = None  # the tower's safetensors state dict; None = random init
    select_layer: int = -1
    select_strategy: str = "full"
    image_grid_pinpoints: list[list[int]] | None = None  # (height, width) canvases; None: 1-6 tiles a side
    vision_aspect_ratio: str = "anyres_max_9"
    projector_type: str = "mlp2x_gelu"
    image_processor: str | None = None  # a transformers image-processor folder (its pinpoints must be these)

    def __post_init__(self):
        if self.tower_config is None:
            raise ValueError("llava_onevision_image adapter: tower_config (a transformers vision config) is required")
        max_tiles(self.vision_aspect_ratio)


@register_modality("llava_onevision_image")
class OnevisionImageAdapter(_OnevisionAdapter):
    modality = "image"
    placeholder = MODALITIES["image"].placeholder
    aliases = (MODALITIES["image"].published_key,)
    config_class = OnevisionImageAdapterConfig

    def build_encoder(self) -> TransformersVisionTower:
        from transformers import AutoImageProcessor, LlavaOnevisionImageProcessor

        tower = super().build_encoder()
        cfg: OnevisionImageAdapterConfig = self.config
        side = tower.image_size
        self.pinpoints = [list(map(int, p)) for p in cfg.image_grid_pinpoints or []] or [
            [side * r, side * c] for r in range(1, 7) for c in range(1, 7)
        ]
        if cfg.image_processor:
            self.processor = AutoImageProcessor.from_pretrained(cfg.image_processor, trust_remote_code=False)
            theirs = [list(map(int, p)) for p in getattr(self.processor, "image_grid_pinpoints", None) or []]
            if theirs != self.pinpoints:
                raise ValueError(
                    f"{cfg.image_processor}: the image processor's image_grid_pinpoints {theirs} are not the "
                    f"adapter's {self.pinpoints}"
                )
        else:
            self.processor = LlavaOnevisionImageProcessor(
                size={"height": side, "width": side}, image_grid_pinpoints=self.pinpoints
            )
        self.max_tiles = max_tiles(cfg.vision_aspect_ratio)
        return tower

    @property
    def num_tokens(self) -> int:
        raise ValueError("an anyres image's token count depends on its size: use tokens_for(features)")

    def layout(self, size: tuple[int, int]) -> AnyresLayout:
        return anyres_layout(size, self.pinpoints, self.encoder.image_size, self.encoder.grid, self.max_tiles)

    def tokens_for(self, features: torch.Tensor) -> int:
        size = self._size(features[ANYRES_SIZE_ROW, :2], "encoder features")
        layout = self.layout(size)
        rows, cols = layout.grid
        return self.encoder.grid**2 + rows * (cols + 1)

    def load(self, path: str) -> Image.Image:
        return load_image(path, self.modality)

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        """[tiles + 1, 3, S, S]: the whole image, its tiles, and a last tile holding (height, width)."""
        if not isinstance(raw, Image.Image):
            raise MediaError(None, f"expected a file path or a PIL image, got {type(raw).__name__}", self.modality)
        check_image_size(raw.size, None, self.modality)
        out = self.processor(images=raw.convert("RGB"), return_tensors="pt")
        pixels = out["pixel_values"][0]
        height, width = (int(v) for v in out["image_sizes"][0])
        size_tile = torch.zeros(1, *pixels.shape[1:], dtype=pixels.dtype)
        size_tile.view(-1)[:2] = torch.tensor([height, width], dtype=pixels.dtype)
        return torch.cat([pixels, size_tile])

    def _size(self, values: torch.Tensor, what: str) -> tuple[int, int]:
        height, width = (float(v) for v in values)
        if not (height >= 1 and width >= 1 and height.is_integer() and width.is_integer()):
            raise ValueError(f"{self.config.adapter}: the {what} do not hold an image size ({height}, {width})")
        return int(height), int(width)

    def _is_preprocessed(self, tensor: torch.Tensor) -> bool:
        side = self.encoder.image_size
        if tensor.dim() != 4 or tuple(tensor.shape[1:]) != (3, side, side) or tensor.shape[0] < 2:
            return False
        last = tensor[-1].reshape(-1)
        try:
            size = self._size(last[:2], "pixels")
        except ValueError:
            return False
        rows, cols = self.layout(size).tiles
        return not last[2:].any() and tensor.shape[0] == 2 + rows * cols

    def encode_tensors(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self._encode_one(t) for t in tensors]

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.encode_tensors(list(batch)))

    def _encode_one(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.tower_tokens(pixels[:-1])
        self._grid_side(tokens.shape[1])
        tokens = tokens.flatten(0, 1).float()
        size = torch.zeros(1, tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
        size[0, :2] = pixels[-1].reshape(-1)[:2]
        return torch.cat([size, tokens])

    def project_features(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self._pack(f) for f in features]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.project_features(list(features)))

    def _pack(self, features: torch.Tensor) -> torch.Tensor:
        """One image's token sequence: the whole image's projected features, then its unpadded (and
        possibly shrunk) grid row by row, each row ended by `image_newline`."""
        size = self._size(features[ANYRES_SIZE_ROW, :2], "encoder features")
        layout = self.layout(size)
        side = self.encoder.grid
        rows, cols = layout.tiles
        self._grid_side((features.shape[0] - 1) // (1 + rows * cols))
        projected = super().project(features[ANYRES_SIZE_ROW + 1 :])
        tiles = projected.view(1 + rows * cols, side * side, -1)
        whole, grid = tiles[0], tiles[1:]
        # tiles (row-major) of patch grids -> one [hidden, rows * side, cols * side] map
        grid = grid.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * side, cols * side)
        grid = grid[:, slice(*layout.rows), slice(*layout.cols)]
        if layout.shrunk is not None:
            grid = F.interpolate(grid[None], list(layout.shrunk), mode="bilinear")[0]
        newline = self.projector.image_newline.to(grid.dtype)[:, None, None].expand(*grid.shape[:-1], 1)
        grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
        return torch.cat([whole, grid])


@dataclasses.dataclass
class OnevisionVideoAdapterConfig(AdapterConfig):
    adapter: str = "llava_onevision_video"
    tower_config: dict[str, Any] | None = None
    checkpoint: str | None = None
    select_layer: int = -1
    select_strategy: str = "full"
    num_frames: int = 32
    projector_type: str = "mlp2x_gelu"
    video_processor: str | None = None  # a transformers video-processor folder

    def __post_init__(self):
        if self.tower_config is None:
            raise ValueError("llava_onevision_video adapter: tower_config (a transformers vision config) is required")
        if self.num_frames < 1:
            raise ValueError("num_frames must be >= 1")


@register_modality("llava_onevision_video")
class OnevisionVideoAdapter(_OnevisionAdapter):
    modality = "video"
    placeholder = MODALITIES["video"].placeholder
    config_class = OnevisionVideoAdapterConfig

    def build_encoder(self) -> TransformersVisionTower:
        from transformers import AutoVideoProcessor, LlavaOnevisionVideoProcessor

        tower = super().build_encoder()
        folder = self.config.video_processor
        side = tower.image_size
        self.processor = (
            AutoVideoProcessor.from_pretrained(folder, trust_remote_code=False)
            if folder
            else LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
        )
        return tower

    @property
    def pooled_side(self) -> int:
        return math.ceil(self.encoder.grid / 2)

    @property
    def num_tokens(self) -> int:
        """Of a video; a still image (one frame) has `pooled_side ** 2 + 1`."""
        return self.config.num_frames * self.pooled_side**2 + 1

    def tokens_for(self, features: torch.Tensor) -> int:
        frames = features.shape[0] // self.encoder.grid**2
        return frames * self.pooled_side**2 + 1

    def load(self, path: str):
        return read_video_frames(path, self.config.num_frames, self.modality)

    def preprocess(self, raw) -> torch.Tensor:
        frames = sampled_frames(raw, self.config.num_frames, self.modality)
        return self.processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]

    def _is_preprocessed(self, tensor: torch.Tensor) -> bool:
        return is_clip_tensor(tensor, self.config.num_frames, self.encoder.image_size)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, S, S] -> [B, T * tokens, width], frame-major."""
        b, t = batch.shape[:2]
        tokens = self.tower_tokens(batch.flatten(0, 1))
        self._grid_side(tokens.shape[1])
        return tokens.reshape(b, t * tokens.shape[1], tokens.shape[2])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Each frame's projected grid shrunk to half its side (bilinear), frames in order, one newline last."""
        side = self.encoder.grid
        if features.shape[1] % (side * side):
            self._grid_side(features.shape[1])  # names the mismatch
        projected = super().project(features)
        b, hidden = projected.shape[0], projected.shape[-1]
        frames = projected.reshape(-1, side, side, hidden).permute(0, 3, 1, 2)
        pooled = F.interpolate(frames, size=[self.pooled_side] * 2, mode="bilinear").permute(0, 2, 3, 1)
        pooled = pooled.reshape(b, -1, hidden)
        newline = self.projector.image_newline.to(pooled.dtype)[None, None].expand(b, 1, hidden)
        return torch.cat([pooled, newline], dim=1)
