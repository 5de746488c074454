"""Built-in modality adapters (installed as ``mcomp.encoders``). Importing registers them."""

from mcomp.encoders.audio import AudioAdapter, AudioAdapterConfig
from mcomp.encoders.audio_hf import WhisperAudioAdapter, WhisperAudioAdapterConfig
from mcomp.encoders.image import ImageAdapter, ImageAdapterConfig
from mcomp.encoders.languagebind import LanguageBindVideoAdapter, LanguageBindVideoAdapterConfig
from mcomp.encoders.point import PointAdapter, PointAdapterConfig
from mcomp.encoders.video import VideoAdapter, VideoAdapterConfig

__all__ = [
    "AudioAdapter",
    "AudioAdapterConfig",
    "WhisperAudioAdapter",
    "WhisperAudioAdapterConfig",
    "ImageAdapter",
    "ImageAdapterConfig",
    "LanguageBindVideoAdapter",
    "LanguageBindVideoAdapterConfig",
    "PointAdapter",
    "PointAdapterConfig",
    "VideoAdapter",
    "VideoAdapterConfig",
]
