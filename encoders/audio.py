"""Audio adapter of the published audio MLLM: BEATs features read by a Q-Former (`qformer_32N_2L`).

Media path (defaults = the published preprocessing):

    file --decode (soundfile: wav/flac/ogg/mp3; PyAV: audio track of mp4/webm/mkv/...)--> [C, N] float in [-1, 1]
    --mix to mono (mean of all channels)--> --resample to 16 kHz (torchaudio sinc, its defaults)-->
    --x 2^15, Kaldi fbank (128 bins, 25 ms / 10 ms, other options default)--> (fbank - 15.41663) / (2 * 6.55582)
    --zero-pad (after normalising) or truncate to 1024 frames--> [1024, 128]
    --BEATs--> [512, 768] --Q-Former--> [32, llm_hidden]

Deliberate differences from the published loader, all in failure or corner cases:
* Channels: upstream averages the two channels of a stereo file but with more channels the fbank uses
  channel 0 only; mp4 audio is averaged over all channels. We average all channels in every case.
* mp4 audio: upstream decodes with ffmpeg via moviepy, resampling inside ffmpeg; we decode with PyAV at
  the stream rate and resample with torchaudio like the other formats (tiny numeric differences).
* Upstream silently turns an unreadable file into zeros; we raise MediaError naming the file, also for
  empty audio and for audio shorter than one 25 ms analysis frame (upstream: an all-zero input).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
import torch

from mcomp.encoders.beats import BEATs, BEATsConfig, load_beats
from mcomp.encoders.qformer import QFormerProjector, QFormerProjectorMixin, parse_qformer_type
from mcomp.errors import MediaError
from mcomp.modalities import MODALITIES
from mcomp.modality import AdapterConfig, ModalityAdapter, register_modality

logger = logging.getLogger(__name__)

# Decoded by libsndfile (soundfile); it detects the format from the content, the extension selects the path.
SOUNDFILE_EXTENSIONS = frozenset({".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff"})
# Containers whose audio track is decoded with PyAV (ffmpeg).
CONTAINER_EXTENSIONS = frozenset({".mp4", ".m4a", ".m4v", ".mov", ".webm", ".mkv", ".mka", ".avi", ".aac"})
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | CONTAINER_EXTENSIONS

# Decoded samples (all channels) a file may hold: 1 GiB as float32, 46 min of 48 kHz stereo. A few KB of
# compressed silence can decode to far more; raise it for longer recordings.
MAX_AUDIO_SAMPLES = 1 << 28

FBANK_MEAN = 15.41663  # published BEATs fbank statistics
FBANK_STD = 6.55582


@dataclasses.dataclass
class DecodedAudio:
    """Decoded samples before any processing."""

    waveform: torch.Tensor  # [channels, samples], float32 in [-1, 1]
    sample_rate: int
    source: str | None = None  # the file it came from, for error messages

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[-1])


# --- decoding ---------------------------------------------------------------------------------
def load_audio(path: str, modality: str = "audio") -> DecodedAudio:
    """Decode an audio file, or the first audio track of a video container, fully into memory."""
    if not os.path.exists(path):
        raise MediaError(path, "file not found", modality)
    if not os.path.isfile(path):
        raise MediaError(path, "not a regular file", modality)
    ext = os.path.splitext(path)[1].lower()
    if ext not in AUDIO_EXTENSIONS:
        raise MediaError(
            path,
            f"unsupported audio file type {ext or '(no extension)'!r}; expected one of {sorted(AUDIO_EXTENSIONS)}",
            modality,
        )
    decoded = _decode_soundfile(path, modality) if ext in SOUNDFILE_EXTENSIONS else _decode_container(path, modality)
    if decoded.num_samples == 0:
        raise MediaError(path, "the audio is empty (zero samples)", modality)
    if not torch.isfinite(decoded.waveform).all():
        raise MediaError(path, "the audio contains NaN or infinite sample values", modality)
    return decoded


def _too_long(path: str, what: str, modality: str) -> MediaError:
    return MediaError(
        path,
        f"{what}, over the limit of {MAX_AUDIO_SAMPLES} samples "
        f"(mcomp.encoders.audio.MAX_AUDIO_SAMPLES; raise it for longer recordings)",
        modality,
    )


def _decode_soundfile(path: str, modality: str) -> DecodedAudio:
    import soundfile as sf

    try:
        with sf.SoundFile(path) as f:
            # sf reads the length the header declares, allocated up front: check it before reading
            if f.frames * f.channels > MAX_AUDIO_SAMPLES:
                raise _too_long(path, f"the header declares {f.frames} x {f.channels} samples", modality)
            data = f.read(dtype="float32", always_2d=True)  # [samples, channels], ints scaled to [-1, 1]
            rate = f.samplerate
    except MediaError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError) as err:
        raise MediaError(path, f"unreadable or corrupt audio file ({err})", modality) from None
    return DecodedAudio(torch.from_numpy(np.ascontiguousarray(data.T)), int(rate), path)


def _decode_container(path: str, modality: str) -> DecodedAudio:
    import av

    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MediaError(path, f"unreadable or corrupt media file ({err})", modality) from None
    with container:
        if not container.streams.audio:
            kinds = [s.type for s in container.streams]
            raise MediaError(path, f"the file has no audio stream (streams: {', '.join(kinds) or 'none'})", modality)
        stream = container.streams.audio[0]
        # Convert every frame to planar float at its own rate and layout: [channels, samples] blocks.
        to_float = av.AudioResampler(format="fltp")
        chunks, rate, total = [], stream.rate, 0
        try:
            for frame in container.decode(stream):
                rate = frame.sample_rate
                chunks.extend(f.to_ndarray() for f in to_float.resample(frame))
                total += frame.samples * max(1, len(frame.layout.channels))
                if total > MAX_AUDIO_SAMPLES:  # the length is known only by decoding: stop once over
                    raise _too_long(path, f"the audio decodes to at least {total} samples", modality)
            chunks.extend(f.to_ndarray() for f in to_float.resample(None))
        except MediaError:
            raise
        except (av.FFmpegError, ValueError) as err:
            raise MediaError(path, f"corrupt audio stream ({err})", modality) from None
    if not chunks or not rate:
        raise MediaError(path, "the audio stream is empty (zero samples)", modality)
    waveform = torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.float32, copy=False))
    return DecodedAudio(waveform, int(rate), path)


def as_decoded_audio(raw: Any, modality: str = "audio") -> DecodedAudio:
    """Accept DecodedAudio or a `(waveform, sample_rate)` pair (waveform [samples] or [channels, samples])."""
    if isinstance(raw, DecodedAudio):
        return raw
    if isinstance(raw, (tuple, list)) and len(raw) == 2 and isinstance(raw[1], (int, np.integer)):
        wave = raw[0] if isinstance(raw[0], torch.Tensor) else torch.from_numpy(np.asarray(raw[0], dtype=np.float32))
        wave = wave.float()
        if wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2:
            raise MediaError(
                None, f"a waveform must be [samples] or [channels, samples], got shape {tuple(wave.shape)}", modality
            )
        if wave.shape[-1] == 0:
            raise MediaError(None, "the audio is empty (zero samples)", modality)
        return DecodedAudio(wave, int(raw[1]))
    raise MediaError(
        None, f"expected a file path, DecodedAudio or (waveform, sample_rate), got {type(raw).__name__}", modality
    )


def mono_resampled(audio: DecodedAudio, sample_rate: int) -> torch.Tensor:
    """Mean over all channels, then resampling (torchaudio's default windowed sinc) -> [samples]."""
    import torchaudio.functional as AF

    mono = audio.waveform.float().mean(dim=0)
    if audio.sample_rate != sample_rate:
        mono = AF.resample(mono, audio.sample_rate, sample_rate)
    return mono


# --- Kaldi fbank front-end ---------------------------------------------------------------------
@dataclasses.dataclass
class FbankFrontend:
    """16 kHz mono waveform -> normalised log-mel fbank [target_length, num_mel_bins] (BEATs input)."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    target_length: int = 1024
    mean: float = FBANK_MEAN
    std: float = FBANK_STD

    @property
    def window_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    def __call__(self, mono: torch.Tensor, source: str | None = None, modality: str = "audio") -> torch.Tensor:
        from torchaudio.compliance import kaldi

        if mono.shape[-1] < self.window_samples:
            raise MediaError(
                source,
                f"the audio is too short: {mono.shape[-1]} samples at {self.sample_rate} Hz is less than "
                f"one {self.frame_length_ms:g} ms analysis frame",
                modality,
            )
        fbank = kaldi.fbank(
            mono[None].float() * 2**15,
            num_mel_bins=self.num_mel_bins,
            sample_frequency=self.sample_rate,
            frame_length=self.frame_length_ms,
            frame_shift=self.frame_shift_ms,
        )
        fbank = (fbank - self.mean) / (2 * self.std)
        frames = fbank.shape[0]
        if frames < self.target_length:  # zero-pad after normalising, padding not masked (as published)
            fbank = torch.nn.functional.pad(fbank, (0, 0, 0, self.target_length - frames))
        elif frames > self.target_length:
            logger.debug("%s: %d fbank frames truncated to %d", source or "audio", frames, self.target_length)
        return fbank[: self.target_length]


# --- adapter -----------------------------------------------------------------------------------
@dataclasses.dataclass
class AudioAdapterConfig(AdapterConfig):
    adapter: str = "audio"
    encoder_config: dict[str, Any] | None = None  # BEATsConfig fields over the published defaults
    checkpoint: str | None = None  # local BEATs file ({'cfg', 'model'} or a state dict); None = random init
    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    target_length: int = 1024  # fbank frames after zero-padding / truncation (10.24 s)
    fbank_mean: float = FBANK_MEAN
    fbank_std: float = FBANK_STD
    projector_type: str = "qformer_32N_2L"  # or any type of mcomp.encoders.projector (features kept whole)
    qformer_hidden_size: int = 768
    qformer_num_heads: int = 12
    qformer_intermediate_size: int = 3072
    qformer_max_positions: int = 1024
    qformer_dropout: float = 0.1

    def __post_init__(self):
        for name in ("sample_rate", "num_mel_bins", "target_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AudioAdapterConfig.{name} must be positive, got {getattr(self, name)}")
        parse_qformer_type(self.projector_type)  # rejects e.g. qformer_0N_2L early

    def frontend(self) -> FbankFrontend:
        return FbankFrontend(
            self.sample_rate,
            self.num_mel_bins,
            self.frame_length_ms,
            self.frame_shift_ms,
            self.target_length,
            self.fbank_mean,
            self.fbank_std,
        )


@register_modality("audio")
class AudioAdapter(QFormerProjectorMixin, ModalityAdapter):
    modality = "audio"
    placeholder = MODALITIES["audio"].placeholder
    config_class = AudioAdapterConfig

    def build_encoder(self) -> BEATs:
        cfg: AudioAdapterConfig = self.config
        self.frontend = cfg.frontend()
        if cfg.checkpoint:
            encoder = load_beats(cfg.checkpoint, cfg.encoder_config)
        else:
            encoder = BEATs(
                BEATsConfig.from_dict(dict(cfg.encoder_config or {}), source="AudioAdapterConfig.encoder_config")
            )
        p = encoder.cfg.input_patch_size
        if cfg.target_length < p or cfg.num_mel_bins < p:
            raise ValueError(
                f"audio adapter: target_length {cfg.target_length} and num_mel_bins {cfg.num_mel_bins} must be "
                f">= the BEATs patch size {p}"
            )
        return encoder

    @property
    def encoder_dim(self) -> int:
        return self.encoder.width

    @property
    def encoder_tokens(self) -> int:
        """BEATs tokens per input: (frames / patch) * (mel bins / patch), 512 at the published size."""
        return self.encoder.num_tokens(self.config.target_length, self.config.num_mel_bins)

    @property
    def num_tokens(self) -> int:
        if isinstance(self.projector, QFormerProjector):
            return self.projector.num_queries
        return self.encoder_tokens

    def load(self, path: str) -> DecodedAudio:
        return load_audio(path, self.modality)

    def waveform(self, raw: Any) -> torch.Tensor:
        """Mono waveform at the configured rate (before the fbank)."""
        return mono_resampled(as_decoded_audio(raw, self.modality), self.config.sample_rate)

    def preprocess(self, raw: Any) -> torch.Tensor:
        audio = as_decoded_audio(raw, self.modality)
        return self.frontend(mono_resampled(audio, self.config.sample_rate), audio.source, self.modality)

    def _is_preprocessed(self, tensor: torch.Tensor) -> bool:
        return tuple(tensor.shape) == (self.config.target_length, self.config.num_mel_bins)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        return self.encoder(batch)
