"""Alternative audio adapter (`audio-whisper`): the encoder of a transformers Whisper model.

Not part of the published ModelCompose release; it offers a second audio encoder behind the same
`<audio>` placeholder (one audio adapter per model). Media path:

    file --decode, mono, resample to 16 kHz (as the BEATs adapter)--> WhisperFeatureExtractor
    (log-mel, zero-padded / truncated to the encoder window: 30 s at the Whisper shapes) --> [mels, 2 * positions]
    --WhisperEncoder--> [positions, d_model] --projector (Q-Former `qformer_<N>N_<L>L` or `mlp2x_gelu`)--> LLM width

The encoder is random-init from a WhisperConfig (inline fields; default = the transformers defaults,
i.e. the whisper-tiny shape) or loaded from a local transformers directory; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn

from mcomp.encoders.audio import as_decoded_audio, load_audio, mono_resampled
from mcomp.encoders.qformer import QFormerProjector, QFormerProjectorMixin, parse_qformer_type
from mcomp.modalities import MODALITIES
from mcomp.modality import AdapterConfig, ModalityAdapter, register_modality

logger = logging.getLogger(__name__)

WHISPER_SAMPLE_RATE = 16000
WHISPER_HOP = 160  # feature frames per second = 100; the encoder halves it (conv stride 2)


@dataclasses.dataclass
class WhisperAudioAdapterConfig(AdapterConfig):
    adapter: str = "audio-whisper"
    encoder_config: dict[str, Any] | None = None  # WhisperConfig fields (random init)
    checkpoint: str | None = None  # local transformers Whisper directory; None = random init
    projector_type: str = "qformer_32N_2L"
    qformer_hidden_size: int = 768
    qformer_num_heads: int = 12
    qformer_intermediate_size: int = 3072
    qformer_max_positions: int = 1500  # Whisper's 30 s window gives 1500 tokens
    qformer_dropout: float = 0.1

    def __post_init__(self):
        if self.checkpoint and self.encoder_config:
            raise ValueError(
                "audio-whisper adapter: give either checkpoint (a local directory) or encoder_config, not both"
            )
        parse_qformer_type(self.projector_type)


def _window_seconds(positions: int) -> int:
    """Whisper's feature extractor works in whole seconds: 2 * positions frames of 10 ms."""
    frames = 2 * positions
    if (frames * WHISPER_HOP) % WHISPER_SAMPLE_RATE:
        raise ValueError(
            f"audio-whisper adapter: max_source_positions {positions} is not a whole number of seconds "
            f"(must be a multiple of {WHISPER_SAMPLE_RATE // WHISPER_HOP // 2})"
        )
    return frames * WHISPER_HOP // WHISPER_SAMPLE_RATE


@register_modality("audio-whisper")
class WhisperAudioAdapter(QFormerProjectorMixin, ModalityAdapter):
    modality = "audio"
    placeholder = MODALITIES["audio"].placeholder
    config_class = WhisperAudioAdapterConfig

    def build_encoder(self) -> nn.Module:
        from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        cfg: WhisperAudioAdapterConfig = self.config
        if cfg.checkpoint:
            path = cfg.checkpoint
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise FileNotFoundError(
                    f"audio-whisper checkpoint {path}: not a transformers directory (no config.json)"
                )
            # WhisperModel also reads WhisperForConditionalGeneration folders (the `model.` prefix is stripped).
            encoder = WhisperModel.from_pretrained(path, local_files_only=True).get_encoder()
            logger.info("loaded Whisper encoder from %s", path)
        else:
            encoder = WhisperEncoder(WhisperConfig(**(cfg.encoder_config or {})))
        wcfg = encoder.config
        if cfg.checkpoint and os.path.isfile(os.path.join(cfg.checkpoint, "preprocessor_config.json")):
            self.feature_extractor = WhisperFeatureExtractor.from_pretrained(cfg.checkpoint, local_files_only=True)
        else:
            self.feature_extractor = WhisperFeatureExtractor(
                feature_size=wcfg.num_mel_bins,
                sampling_rate=WHISPER_SAMPLE_RATE,
                hop_length=WHISPER_HOP,
                chunk_length=_window_seconds(wcfg.max_source_positions),
            )
        expected = 2 * wcfg.max_source_positions
        if self.feature_extractor.nb_max_frames != expected or self.feature_extractor.feature_size != wcfg.num_mel_bins:
            raise ValueError(
                f"audio-whisper adapter: the feature extractor gives {self.feature_extractor.feature_size} x "
                f"{self.feature_extractor.nb_max_frames} features but the encoder expects "
                f"{wcfg.num_mel_bins} x {expected}"
            )
        return encoder

    @property
    def encoder_dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def encoder_tokens(self) -> int:
        return self.encoder.config.max_source_positions

    @property
    def num_tokens(self) -> int:
        if isinstance(self.projector, QFormerProjector):
            return self.projector.num_queries
        return self.encoder_tokens

    def load(self, path: str):
        return load_audio(path, self.modality)

    def preprocess(self, raw: Any) -> torch.Tensor:
        audio = as_decoded_audio(raw, self.modality)
        mono = mono_resampled(audio, WHISPER_SAMPLE_RATE)
        features = self.feature_extractor(mono.numpy(), sampling_rate=WHISPER_SAMPLE_RATE, return_tensors="pt")[
            "input_features"
        ]
        return features[0]  # [mels, frames]

    def _is_preprocessed(self, tensor: torch.Tensor) -> bool:
        return tuple(tensor.shape) == (self.feature_extractor.feature_size, self.feature_extractor.nb_max_frames)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        dtype = self.encoder.conv1.weight.dtype
        return self.encoder(input_features=batch.to(dtype)).last_hidden_state
