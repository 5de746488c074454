"""Image adapter: open_clip vision tower, penultimate-layer patch tokens, pad-to-square preprocessing.

Defaults mirror the published image MLLM (LLaVA-1.5 style): CLIP ViT-L/14-336 (OpenAI, QuickGELU),
`hidden_states[-2]`, CLS dropped (576 x 1024), `mlp2x_gelu` projector.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from mcomp.encoders.clip_tower import ClipVisionTower
from mcomp.errors import MediaError
from mcomp.modalities import MODALITIES
from mcomp.modality import AdapterConfig, ModalityAdapter, register_modality

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_pixel_limit() -> int | None:
    """Pillow's decompression-bomb limit, read at each call so a user who raises it is honoured."""
    return Image.MAX_IMAGE_PIXELS


def check_image_size(size: tuple[int, int], path: str | None, modality: str = "image") -> None:
    """Refuse an image over the decompression-bomb limit, from its header, before any pixel is decoded.

    Pillow only warns between `Image.MAX_IMAGE_PIXELS` and twice that; a sample that decodes to
    gigabytes must not pass on a warning, so both ranges are an error here.
    """
    limit = image_pixel_limit()
    width, height = size
    if limit is not None and max(1, width) * max(1, height) > limit:
        raise MediaError(
            path,
            f"image of {width} x {height} pixels exceeds the decompression-bomb limit of {limit} pixels "
            f"(PIL.Image.MAX_IMAGE_PIXELS; raise it to accept larger images)",
            modality,
        )


def _bomb_reason(err: Exception) -> str:
    """Pillow's own refusal (over twice the limit, raised before the size is known to us)."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    what = f"image of {found.group(1)} pixels" if found else "image"
    return (
        f"{what} exceeds the decompression-bomb limit of {image_pixel_limit()} pixels "
        f"(PIL.Image.MAX_IMAGE_PIXELS; raise it to accept larger images)"
    )


def load_image(path: str, modality: str = "image") -> Image.Image:
    """Decode an image file fully (a truncated file fails here, not later) as RGB."""
    try:
        with Image.open(path) as img:  # reads the header only
            check_image_size(img.size, path, modality)
            img.load()
            return img.convert("RGB")
    except MediaError:  # a ValueError: not to be taken for corruption below
        raise
    except FileNotFoundError:
        raise MediaError(path, "file not found", modality) from None
    except UnidentifiedImageError:
        raise MediaError(path, "not a recognised image format", modality) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # the warning under -W error
        raise MediaError(path, _bomb_reason(err), modality) from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports truncation/corruption as OSError
        raise MediaError(path, f"corrupt or truncated image ({err})", modality) from None


def check_working_size(size: tuple[int, int], image_size: int, aspect_ratio: str, modality: str = "image") -> None:
    """Bound the intermediate image too: the square canvas (pad) or the short-side resize of a long, thin
    image can be far larger than the image itself."""
    limit = image_pixel_limit()
    width, height = max(1, size[0]), max(1, size[1])
    if aspect_ratio == "pad":
        side = max(width, height)
        pixels, step = side * side, f"padding it to a square gives {side} x {side} pixels"
    else:
        scale = image_size / min(width, height)
        new_w, new_h = round(width * scale), round(height * scale)
        pixels, step = new_w * new_h, f"resizing its short side to {image_size} gives {new_w} x {new_h} pixels"
    if limit is not None and pixels > limit:
        raise MediaError(
            None,
            f"the image is {width} x {height} pixels and {step}, over the decompression-bomb limit of "
            f"{limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)",
            modality,
        )


def expand_to_square(img: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    """Pad to a square canvas filled with int(255*mean), the image centred with floor offsets."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    background = tuple(int(255 * m) for m in mean)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def clip_pixel_transform(image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """Resize the shortest edge (bicubic), centre-crop, scale to [0,1], normalise."""
    import open_clip

    return open_clip.image_transform(
        image_size, is_train=False, mean=mean, std=std, resize_mode="shortest", interpolation="bicubic"
    )


@dataclasses.dataclass
class ImageAdapterConfig(AdapterConfig):
    adapter: str = "image"
    tower: str = "ViT-L-14-336-quickgelu"  # an open_clip model name
    tower_config: dict[str, Any] | None = None  # inline open_clip model config (overrides `tower`)
    checkpoint: str | None = None  # local weights file; None = random init (never a download)
    select_layer: int = -2
    select_feature: str = "patch"  # "patch": CLS dropped; "cls_patch": CLS kept
    image_aspect_ratio: str = "pad"  # "pad" (pad to square) or "resize" (centre-crop only)
    projector_type: str = "mlp2x_gelu"
    # a transformers image-processor folder (preprocessor or processor config) whose preprocessing is
    # used instead of the published pad + CLIP transform: an imported model's own (mcomp import llava-hf)
    image_processor: str | None = None

    def __post_init__(self):
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}")
        if self.image_aspect_ratio not in ("pad", "resize"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'resize', got {self.image_aspect_ratio!r}")


@register_modality("image")
class ImageAdapter(ModalityAdapter):
    modality = "image"
    placeholder = MODALITIES["image"].placeholder
    aliases = (MODALITIES["image"].published_key,)  # "vision", the released key
    config_class = ImageAdapterConfig

    def build_encoder(self) -> ClipVisionTower:
        cfg: ImageAdapterConfig = self.config
        tower = ClipVisionTower(cfg.tower, cfg.tower_config, cfg.checkpoint)
        if cfg.image_processor:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(cfg.image_processor, trust_remote_code=False)
            self._transform = lambda img: processor(images=img, return_tensors="pt")["pixel_values"][0]
        else:
            self._transform = clip_pixel_transform(tower.image_size)
        return tower

    @property
    def encoder_dim(self) -> int:
        return self.encoder.width

    @property
    def num_tokens(self) -> int:
        return self.encoder.num_patches + (1 if self.config.select_feature == "cls_patch" else 0)

    def load(self, path: str) -> Image.Image:
        return load_image(path, self.modality)

    def preprocess(self, raw: Image.Image) -> torch.Tensor:
        if not isinstance(raw, Image.Image):
            raise MediaError(None, f"expected a file path or a PIL image, got {type(raw).__name__}", self.modality)
        processor_resizes = self.config.image_processor is not None
        aspect_ratio = "resize" if processor_resizes else self.config.image_aspect_ratio
        check_working_size(raw.size, self.encoder.image_size, aspect_ratio, self.modality)
        img = raw.convert("RGB")
        if aspect_ratio == "pad":
            img = expand_to_square(img, CLIP_MEAN)
        return self._transform(img)

    def _is_preprocessed(self, tensor: torch.Tensor) -> bool:
        size = self.encoder.image_size
        return tuple(tensor.shape) == (3, size, size)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(batch, self.config.select_layer)
        return tokens[:, 1:] if self.config.select_feature == "patch" else tokens
