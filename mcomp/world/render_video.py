"""Videos: the entity's icon (as in images) gliding in a straight line over a fixed background.

Distractors: size, start and end position (so direction and speed), a slow spin, background.
Encoding: MPEG-4 part 2 (`mpeg4`, yuv420p, constant quantiser) in MP4 with the `bitexact` flags, so
no encoder version string or timestamp ends up in the file and the same frames give the same bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mcomp.world.entities import Entity
from mcomp.world.render_image import background, draw_icon, paste


def sample_params(rng: np.random.Generator, size: int) -> dict[str, Any]:
    height = float(rng.uniform(0.45, 0.65) * size)
    margin = 0.5 * height * 1.1
    lo, hi = margin, size - margin
    start = rng.uniform(lo, hi, size=2)
    for _ in range(100):  # move at least a fifth of the frame
        end = rng.uniform(lo, hi, size=2)
        if np.hypot(*(end - start)) >= 0.2 * size:
            break
    return {
        "height": height,
        "start": [float(v) for v in start],
        "end": [float(v) for v in end],
        "angle0": float(rng.uniform(-15, 15)),
        "spin": float(rng.uniform(-15, 15)),  # total degrees over the clip
        "background_seed": int(rng.integers(2**31)),
    }


def render_video(
    entity: Entity, rgb, rng: np.random.Generator, size: int = 64, frames: int = 12
) -> tuple[list[np.ndarray], dict[str, Any]]:
    p = sample_params(rng, size)
    bg = background(size, np.random.default_rng(p["background_seed"]))
    out = []
    for t in np.linspace(0.0, 1.0, frames):
        cx = p["start"][0] + t * (p["end"][0] - p["start"][0])
        cy = p["start"][1] + t * (p["end"][1] - p["start"][1])
        icon = draw_icon(size, entity.shape, rgb, p["height"], p["angle0"] + t * p["spin"], supersample=2)
        out.append(paste(bg, icon, cx, cy))
    return out, p


def write_mp4(path: str, frames: list[np.ndarray], fps: int = 8, qscale: int = 3) -> None:
    import av

    height, width = frames[0].shape[:2]
    with av.open(path, mode="w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        # constant quantiser (ffmpeg's -q:v): global_quality = q * FF_QP2LAMBDA (118)
        stream.options = {"flags": "+bitexact+qscale", "global_quality": str(qscale * 118), "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
