"""Built-in modality adapters (installed as ``mcomp.encoders``). Importing registers them."""
from mcomp.encoders.image import ImageAdapter, ImageAdapterConfig

__all__ = ["ImageAdapter", "ImageAdapterConfig"]
