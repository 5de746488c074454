"""Built-in modality adapters (installed as ``mcomp.encoders``). Importing registers them."""
from mcomp.encoders.image import ImageAdapter, ImageAdapterConfig
from mcomp.encoders.video import VideoAdapter, VideoAdapterConfig
from mcomp.encoders.point import PointAdapter, PointAdapterConfig

__all__ = ["ImageAdapter", "ImageAdapterConfig", "PointAdapter", "PointAdapterConfig", "VideoAdapter", "VideoAdapterConfig"]
