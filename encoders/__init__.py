"""Built-in modality adapters (installed as ``mcomp.encoders``). Importing registers them."""
from mcomp.encoders.image import ImageAdapter, ImageAdapterConfig
from mcomp.encoders.video import VideoAdapter, VideoAdapterConfig
from mcomp.encoders.point import PointAdapter, PointAdapterConfig
from mcomp.encoders.audio import AudioAdapter, AudioAdapterConfig
from mcomp.encoders.audio_hf import WhisperAudioAdapter, WhisperAudioAdapterConfig

__all__ = ["AudioAdapter", "AudioAdapterConfig", "WhisperAudioAdapter", "WhisperAudioAdapterConfig", "ImageAdapter", "ImageAdapterConfig", "PointAdapter", "PointAdapterConfig", "VideoAdapter", "VideoAdapterConfig"]
