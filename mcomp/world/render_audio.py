"""Audio: one tone per clip. Shape -> timbre, colour -> pitch.

Timbres (band-limited additive synthesis, partials below 7 kHz): `sine` (pure), `square` (odd
harmonics 1/k, buzzy), `sawtooth` (all harmonics 1/k, bright), `pulsed` (sine gated on/off at 8 Hz),
`bell` (inharmonic partials 1, 2.76, 5.4 with a 0.3 s exponential decay), `warble` (sine with 6 Hz
vibrato of +-5%; too close to `sine` for the tiny fbank encoder, so unused by default). The
fundamental is the strongest partial in every timbre.
Pitches of neighbouring colours are x1.4 apart (160 Hz to 1.7 kHz), far beyond the detune distractor.
Distractors: detune (+-2%), loudness, onset, duration, faint background noise.
Written as 16-bit PCM mono WAV with soundfile (no timestamps: same samples, same bytes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mcomp.world.entities import Entity

TIMBRES = ("sine", "square", "sawtooth", "pulsed", "bell", "warble")
BELL_PARTIALS = ((1.0, 1.0), (2.76, 0.5), (5.40, 0.25))  # inharmonic, like a struck ring
MAX_PARTIAL_HZ = 7000.0
TABLE_SIZE = 4096


def sample_params(rng: np.random.Generator, seconds: float) -> dict[str, Any]:
    onset = float(rng.uniform(0.0, 0.15) * seconds)
    duration = float(rng.uniform(0.55, 0.8) * seconds)
    return {
        "detune": float(rng.uniform(-0.02, 0.02)),
        "amplitude": float(rng.uniform(0.25, 0.8)),
        "onset": onset,
        "duration": min(duration, seconds - onset),
        "noise": float(rng.uniform(0.0, 0.01)),
        "phase": float(rng.uniform(0, 2 * np.pi)),
        "noise_seed": int(rng.integers(2**31)),
    }


def tone(timbre: str, freq: float, t: np.ndarray, phase: float = 0.0) -> np.ndarray:
    """A unit-peak waveform of the timbre at `freq` Hz over times `t` (seconds)."""
    if timbre == "sine":
        wave = np.sin(2 * np.pi * freq * t + phase)
    elif timbre in ("square", "sawtooth"):
        # one band-limited period as a table (partials 1/k below MAX_PARTIAL_HZ), read at the running phase
        step = 2 if timbre == "square" else 1
        grid = np.arange(TABLE_SIZE + 1) / TABLE_SIZE
        harmonics = np.arange(1, int(MAX_PARTIAL_HZ // freq) + 1, step)
        table = (np.sin(2 * np.pi * np.outer(grid, harmonics)) / harmonics).sum(axis=1)
        cycles = np.mod(freq * t + phase / (2 * np.pi), 1.0)
        wave = np.interp(cycles, grid, table)
    elif timbre == "pulsed":
        gate = (np.floor(t * 16.0) % 2 == 0).astype(np.float64)  # 8 Hz: 62.5 ms on, 62.5 ms off
        kernel = np.hanning(int(0.004 * _rate(t)) | 1)  # soften the clicks
        gate = np.convolve(gate, kernel / kernel.sum(), mode="same")
        wave = gate * np.sin(2 * np.pi * freq * t + phase)
    elif timbre == "bell":
        wave = np.zeros_like(t)
        for ratio, amp in BELL_PARTIALS:
            if ratio * freq < MAX_PARTIAL_HZ:
                wave += amp * np.sin(2 * np.pi * ratio * freq * t + ratio * phase)
        wave *= np.exp(-t / 0.3)
    elif timbre == "warble":
        depth, rate = 0.05, 6.0
        wave = np.sin(2 * np.pi * freq * t + phase + depth * freq / rate * np.sin(2 * np.pi * rate * t))
    else:
        raise ValueError(f"unknown timbre {timbre!r} (expected one of {TIMBRES})")
    peak = np.abs(wave).max()
    return wave / peak if peak > 0 else wave


def _rate(t: np.ndarray) -> float:
    return 1.0 / float(t[1] - t[0]) if len(t) > 1 else 16000.0


def render_audio(
    entity: Entity, timbre: str, pitch_hz: float, rng: np.random.Generator, rate: int = 16000, seconds: float = 1.0
) -> tuple[np.ndarray, dict[str, Any]]:
    """float32 [samples] in [-1, 1], and the distractor values used."""
    p = sample_params(rng, seconds)
    n = int(round(seconds * rate))
    out = np.zeros(n)
    start, length = int(round(p["onset"] * rate)), int(round(p["duration"] * rate))
    t = np.arange(length) / rate
    wave = tone(timbre, pitch_hz * (1 + p["detune"]), t, p["phase"])
    fade = min(int(0.01 * rate), length // 2)
    envelope = np.ones(length)
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        envelope[:fade], envelope[length - fade :] = ramp, ramp[::-1]
    out[start : start + length] = p["amplitude"] * envelope * wave
    out += np.random.default_rng(p["noise_seed"]).normal(0.0, p["noise"], n)
    return np.clip(out, -1.0, 1.0).astype(np.float32), p


def write_wav(path: str, samples: np.ndarray, rate: int = 16000) -> None:
    import soundfile as sf

    sf.write(path, samples, rate, subtype="PCM_16", format="WAV")
