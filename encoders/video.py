"""Video adapter: 8 uniformly sampled frames, a per-frame open_clip vision tower, all tokens kept.

Mirrors the published video MLLM's layout (LanguageBind-Video features): frames at
floor(linspace(0, n-1, 8)), short side resized to 224 and centre-cropped, CLIP normalisation,
`hidden_states[-2]` of every frame with CLS kept (8 x 257 tokens for ViT-L/14 at 224), frame-major,
then `mlp2x_gelu`. A still image is one frame (257 tokens), as in the published evaluation.
Deviation, on purpose: the released preprocessing flips clips at random even at evaluation
(RandomHorizontalFlip p=0.5); mcomp does not flip by default, and `flip_probability=0.5` flips as
often, drawn per clip from `flip_seed` and its content, so the same file gives the same tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mcomp.encoders.clip_tower import ClipVisionTower
from mcomp.encoders.image import CLIP_MEAN, CLIP_STD, image_pixel_limit, load_image
from mcomp.errors import MediaError
from mcomp.modalities import MODALITIES
from mcomp.modality import AdapterConfig, ModalityAdapter, register_modality

VIDEO_EXTENSIONS = {".mp4", ".webm", ".avi", ".mkv", ".mov", ".gif", ".m4v", ".mpeg", ".mpg"}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def frame_indices(total: int, num_frames: int) -> list[int]:
    """floor(linspace(0, total-1, num_frames)), the published uniform sampling."""
    return [int(i) for i in np.floor(np.linspace(0, total - 1, num_frames))]


def flip_draw(frames: list[np.ndarray], seed: int) -> float:
    """A number in [0, 1) fixed by `seed` and the frames' content (the clip's flip draw)."""
    h = hashlib.sha256(f"{seed}\0".encode())
    for frame in frames:
        h.update(np.ascontiguousarray(frame).tobytes())
    return int.from_bytes(h.digest()[:8], "little") / 2.0**64


def check_clip_size(width: int, height: int, num_frames: int, path: str | None, modality: str = "video") -> None:
    """The sampled frames are held together, like one image of them all: their pixels together stay
    within the decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS), checked before decoding."""
    limit = image_pixel_limit()
    if limit is not None and max(1, width) * max(1, height) * num_frames > limit:
        raise MediaError(
            path,
            f"{num_frames} frames of {width} x {height} pixels exceed the decompression-bomb limit of {limit} "
            f"pixels per clip (PIL.Image.MAX_IMAGE_PIXELS; raise it to accept larger videos)",
            modality,
        )


def sampled_frames(raw, num_frames: int, modality: str = "video") -> list[np.ndarray]:
    """Decoded media as the frames a clip gives its encoder: a still image (a PIL image, or a list of one
    frame) stays one frame; other lists of frames are sampled to `num_frames`. Checked to be H x W x 3
    frames of one size, within the decompression-bomb limit."""
    if isinstance(raw, Image.Image):
        raw = [np.asarray(raw.convert("RGB"))]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise MediaError(
            None, f"expected a file path, a PIL image or a list of frames, got {type(raw).__name__}", modality
        )
    if len(raw) not in (1, num_frames):
        raw = [raw[i] for i in frame_indices(len(raw), num_frames)]
    frames = [np.asarray(f) for f in raw]
    shapes = sorted({f.shape for f in frames})
    if len(shapes) != 1 or len(shapes[0]) != 3 or shapes[0][2] != 3:
        raise MediaError(None, f"expected frames of one size, each H x W x 3, got shapes {shapes}", modality)
    check_clip_size(shapes[0][1], shapes[0][0], len(frames), None, modality)  # before any float copy
    return frames


def is_clip_tensor(tensor: torch.Tensor, num_frames: int, size: int) -> bool:
    """A preprocessed clip: [T, 3, size, size] with T = num_frames, or 1 for a still."""
    return tensor.dim() == 4 and tensor.shape[0] in (1, num_frames) and tuple(tensor.shape[1:]) == (3, size, size)


def _count_frames(path: str) -> int:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def read_video_frames(path: str, num_frames: int, modality: str = "video") -> list[np.ndarray]:
    """Decode `num_frames` uniformly spaced RGB frames (H, W, 3 uint8) with PyAV.

    A still image stays one frame, as the published evaluation keeps it (LanguageBind's image path:
    one frame, so one frame's tokens and no temporal embedding); the published code tells stills by
    the `.jpg` suffix, mcomp by any image suffix.
    """
    import av

    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise MediaError(path, "file not found", modality)
    if ext in IMAGE_EXTENSIONS:
        return [np.asarray(load_image(path, modality))]
    if ext not in VIDEO_EXTENSIONS:
        raise MediaError(
            path, f"unsupported video extension {ext!r} (expected one of {sorted(VIDEO_EXTENSIONS)})", modality
        )
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(path, "the file has no video stream", modality)
            codec = container.streams.video[0].codec_context
            check_clip_size(codec.width, codec.height, num_frames, path, modality)  # from the header
        total = _count_frames(path)
        if total <= 0:
            raise MediaError(path, "the video has no frames", modality)
        wanted = frame_indices(total, num_frames)
        picked: dict[int, np.ndarray] = {}
        last = None
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    check_clip_size(frame.width, frame.height, num_frames, path, modality)  # size may change mid-stream
                    picked[i] = frame.to_ndarray(format="rgb24")
                last = (i, frame)
                if i >= wanted[-1]:
                    break
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as err:
        raise MediaError(path, f"cannot decode video ({err})", modality) from None
    if last is None:
        raise MediaError(path, "no decodable frame in the video", modality)
    if len(picked) < len(set(wanted)):
        # The container promised more frames than decode; take the last decoded frame for the rest.
        fallback = last[1].to_ndarray(format="rgb24")
        picked.update({i: fallback for i in wanted if i not in picked})
    return [picked[i] for i in wanted]


@dataclasses.dataclass
class VideoAdapterConfig(AdapterConfig):
    adapter: str = "video"
    tower: str = "ViT-L-14"  # an open_clip model name (224 px, 16x16 patches + CLS = 257 tokens)
    tower_config: dict[str, Any] | None = None
    checkpoint: str | None = None
    num_frames: int = 8
    select_layer: int = -2
    pool: str = "none"  # "none" | "time" (average frames in groups) | "space" (average patch grids)
    pool_size: int = 2  # frames per group (time) or patch window side (space)
    projector_type: str = "mlp2x_gelu"
    # the released preprocessing flips a clip horizontally with p = 0.5, at evaluation too; mcomp draws
    # it per clip from `flip_seed` and the frames' bytes, so a file always gives the same tokens
    flip_probability: float = 0.0
    flip_seed: int = 0
    # a transformers video-processor folder whose preprocessing of the sampled frames is used instead of
    # the published one: an imported model's own (mcomp import llava-hf of a Video-LLaVA folder)
    video_processor: str | None = None

    def __post_init__(self):
        if self.pool not in ("none", "time", "space"):
            raise ValueError(f"pool must be 'none', 'time' or 'space', got {self.pool!r}")
        if self.num_frames < 1 or self.pool_size < 1:
            raise ValueError("num_frames and pool_size must be >= 1")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        if self.pool == "time" and self.num_frames % self.pool_size:
            raise ValueError(f"pool_size {self.pool_size} must divide num_frames {self.num_frames} for time pooling")


@register_modality("video")
class VideoAdapter(ModalityAdapter):
    modality = "video"
    placeholder = MODALITIES["video"].placeholder
    config_class = VideoAdapterConfig

    def build_encoder(self) -> ClipVisionTower:
        cfg: VideoAdapterConfig = self.config
        tower = ClipVisionTower(cfg.tower, cfg.tower_config, cfg.checkpoint)
        grid = tower.image_size // tower.patch_size
        if cfg.pool == "space" and grid % cfg.pool_size:
            raise ValueError(f"pool_size {cfg.pool_size} must divide the {grid}x{grid} patch grid for space pooling")
        return tower

    @property
    def encoder_dim(self) -> int:
        return self.encoder.width

    @property
    def tokens_per_frame(self) -> int:
        patches = self.encoder.num_patches
        if self.config.pool == "space":
            patches //= self.config.pool_size**2
        return 1 + patches

    @property
    def num_tokens(self) -> int:
        """Of a video; a still image has one frame's (`tokens_per_frame`)."""
        frames = self.config.num_frames
        if self.config.pool == "time":
            frames //= self.config.pool_size
        return frames * self.tokens_per_frame

    def load(self, path: str) -> list[np.ndarray]:
        return read_video_frames(path, self.config.num_frames, self.modality)

    def preprocess(self, raw) -> torch.Tensor:
        """Frames -> [T, 3, S, S]: scale to [0,1], short side to S (bilinear), centre crop, normalise.

        A still image (a PIL image, or a list of one frame) stays one frame (T = 1); other lists of
        frames are sampled to `num_frames`."""
        frames = sampled_frames(raw, self.config.num_frames, self.modality)
        processor = self._video_processor()
        if processor is not None:
            return processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
        clip = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
        size = self.encoder.image_size
        h, w = clip.shape[-2:]
        # pytorchvideo's ShortSideScale, as released: the long side floor(long / short * size),
        # bilinear, no antialiasing; then torchvision's CenterCropVideo, offsets rounded (half to even)
        if w < h:
            new_h, new_w = math.floor(h / w * size), size
        else:
            new_h, new_w = size, math.floor(w / h * size)
        clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        clip = clip[:, :, top : top + size, left : left + size]
        if self.config.flip_probability and flip_draw(frames, self.config.flip_seed) < self.config.flip_probability:
            clip = clip.flip(-1)  # RandomHorizontalFlipVideo: the whole clip, after the crop
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (clip - mean) / std

    def _video_processor(self):
        """The transformers video processor of `config.video_processor` (built once), or None."""
        folder = getattr(self.config, "video_processor", None)
        if folder is None:
            return None
        if getattr(self, "_processor", None) is None:
            from transformers import AutoVideoProcessor

            self._processor = AutoVideoProcessor.from_pretrained(folder, trust_remote_code=False)
        return self._processor

    def _is_preprocessed(self, tensor: torch.Tensor) -> bool:
        return is_clip_tensor(tensor, self.config.num_frames, self.encoder.image_size)

    def frame_tokens(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, S, S] -> [B, T, 1 + patches, width]: the tower's tokens of every frame, CLS first."""
        b, t = batch.shape[:2]
        tokens = self.encoder(batch.flatten(0, 1), self.config.select_layer)
        return tokens.view(b, t, tokens.shape[1], tokens.shape[2])

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, S, S] -> [B, T' * tokens_per_frame, width], frame-major, CLS first in each frame
        (T = 1 for stills, which time pooling leaves as they are)."""
        tokens = self.frame_tokens(batch)
        b = tokens.shape[0]
        if self.config.pool == "time" and tokens.shape[1] > 1:
            k = self.config.pool_size
            tokens = tokens.view(b, tokens.shape[1] // k, k, *tokens.shape[2:]).mean(dim=2)
        elif self.config.pool == "space":
            k = self.config.pool_size
            cls, patches = tokens[:, :, :1], tokens[:, :, 1:]
            grid = int(patches.shape[2] ** 0.5)
            d = patches.shape[-1]
            grid_maps = patches.reshape(-1, grid, grid, d).permute(0, 3, 1, 2)
            pooled = F.avg_pool2d(grid_maps, k).flatten(2).transpose(1, 2)
            tokens = torch.cat([cls, pooled.view(b, tokens.shape[1], -1, d)], dim=2)
        return tokens.flatten(1, 2)
