"""Images: the entity's shape as a big, bold, flat-shaded icon in its colour on a pale background.

Shape -> silhouette (cube: square with a lighter top and darker side face; sphere: disc with a
highlight; cone: triangle on a darker elliptic base; cylinder: upright rectangle with a lighter top
ellipse; torus: thick ring). Colour -> fill (shading is a light/dark version of the same colour).
Distractors: size, position, rotation (+-20 degrees), background grey level, tint, gradient and noise.
Drawing uses Pillow at 4x resolution, then a box-filter downscale: deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mcomp.world.entities import Entity

SUPERSAMPLE = 4


def _mix(rgb, target: float, amount: float) -> tuple[int, int, int]:
    return tuple(int(round(c + (target - c) * amount)) for c in rgb)


def lighter(rgb) -> tuple[int, int, int]:
    return _mix(rgb, 255.0, 0.35)


def darker(rgb) -> tuple[int, int, int]:
    return _mix(rgb, 0.0, 0.35)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 48) -> list[tuple[float, float]]:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return list(zip(cx + rx * np.cos(a), cy + ry * np.sin(a)))


def icon_polygons(shape: str, rgb, h: float, c: float) -> list[tuple[list[tuple[float, float]], tuple[int, ...]]]:
    """The icon as (polygon, RGBA fill) pairs, drawn in order; `h` = height, `c` = centre (x = y)."""
    fill, light, dark = tuple(rgb) + (255,), lighter(rgb) + (255,), darker(rgb) + (255,)
    clear = (0, 0, 0, 0)
    if shape == "sphere":
        r = h / 2
        return [(_ellipse(c, c, r, r), fill), (_ellipse(c - 0.35 * r, c - 0.35 * r, 0.28 * r, 0.28 * r), light)]
    if shape == "cube":
        face = 0.78 * h
        off = h - face
        x0, y0 = c - h / 2, c - h / 2 + off  # front face top-left
        return [
            ([(x0, y0), (x0 + face, y0), (x0 + face, y0 + face), (x0, y0 + face)], fill),
            ([(x0, y0), (x0 + off, y0 - off), (x0 + face + off, y0 - off), (x0 + face, y0)], light),
            (
                [
                    (x0 + face, y0),
                    (x0 + face + off, y0 - off),
                    (x0 + face + off, y0 + face - off),
                    (x0 + face, y0 + face),
                ],
                dark,
            ),
        ]
    if shape == "cone":
        w, eh = 0.85 * h, 0.2 * h
        top, base = c - h / 2, c + h / 2 - eh / 2
        return [(_ellipse(c, base, w / 2, eh / 2), dark), ([(c, top), (c - w / 2, base), (c + w / 2, base)], fill)]
    if shape == "cylinder":
        w, eh = 0.58 * h, 0.22 * h
        top, bottom = c - h / 2 + eh / 2, c + h / 2 - eh / 2
        body = [(c - w / 2, top), (c + w / 2, top), (c + w / 2, bottom), (c - w / 2, bottom)]
        return [(_ellipse(c, bottom, w / 2, eh / 2), fill), (body, fill), (_ellipse(c, top, w / 2, eh / 2), light)]
    if shape == "torus":
        r = h / 2
        return [(_ellipse(c, c, r, r, 64), fill), (_ellipse(c, c, 0.4 * r, 0.4 * r), clear)]
    raise ValueError(f"no image silhouette for shape {shape!r}")


def draw_icon(
    size: int, shape: str, rgb, height: float, angle: float = 0.0, supersample: int = SUPERSAMPLE
) -> Image.Image:
    """An RGBA layer of `size`x`size` pixels with the shape centred, `height` pixels tall, rotated by `angle`
    degrees (counter-clockwise); transparent elsewhere. Drawn at `supersample` times the size, then box-filtered."""
    s = supersample
    big = size * s
    c = big / 2.0
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    a = np.radians(angle)
    cos, sin = np.cos(a), np.sin(a)
    for polygon, colour in icon_polygons(shape, rgb, height * s, c):
        xy = np.asarray(polygon) - c
        rotated = np.stack([xy[:, 0] * cos + xy[:, 1] * sin, -xy[:, 0] * sin + xy[:, 1] * cos], axis=1) + c
        d.polygon([tuple(p) for p in rotated.round(3).tolist()], fill=colour)
    # Downscale with premultiplied alpha so transparent pixels do not darken the edges.
    return layer.convert("RGBa").resize((size, size), Image.BOX).convert("RGBA")


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A pale, slightly tinted, vertically graded, lightly noisy background [size, size, 3] uint8."""
    grey = rng.uniform(175, 245)
    tint = rng.uniform(-18, 18, size=3)
    slope = rng.uniform(-20, 20)
    ramp = np.linspace(-0.5, 0.5, size)[:, None, None] * slope
    noise = rng.normal(0, 3.0, size=(size, size, 3))
    img = grey + tint[None, None, :] + ramp + noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def paste(canvas: np.ndarray, icon: Image.Image, cx: float, cy: float) -> np.ndarray:
    """Alpha-composite an icon layer (centred at its own centre) so that its centre lands on (cx, cy)."""
    size = canvas.shape[0]
    dx, dy = int(round(cx - icon.width / 2)), int(round(cy - icon.height / 2))
    base = Image.fromarray(canvas).convert("RGBA")
    shifted = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    shifted.paste(icon, (dx, dy))
    return np.asarray(Image.alpha_composite(base, shifted).convert("RGB"))


def sample_params(rng: np.random.Generator, size: int) -> dict[str, Any]:
    height = float(rng.uniform(0.5, 0.8) * size)
    margin = 0.5 * height * 1.15  # rotated icons stay (nearly) inside the frame
    return {
        "height": height,
        "cx": float(rng.uniform(margin, size - margin)),
        "cy": float(rng.uniform(margin, size - margin)),
        "angle": float(rng.uniform(-20, 20)),
        "background_seed": int(rng.integers(2**31)),
    }


def render_image(entity: Entity, rgb, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, dict[str, Any]]:
    """[size, size, 3] uint8 image of the entity, and the distractor values used."""
    p = sample_params(rng, size)
    canvas = background(size, np.random.default_rng(p["background_seed"]))
    icon = draw_icon(size, entity.shape, rgb, p["height"], p["angle"])
    return paste(canvas, icon, p["cx"], p["cy"]), p


def write_png(path: str, pixels: np.ndarray) -> None:
    # No text chunks or timestamps: the same pixels give the same bytes.
    Image.fromarray(pixels, "RGB").save(path, format="PNG", optimize=False, compress_level=6)
