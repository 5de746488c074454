"""How the synthetic world draws an entity in each modality: one renderer per modality, by name.

A renderer writes one media file: `render(scene, path)`, where `scene` holds the entity, its shape
and colour (RGB and pitch), the file's own random generator and the modality's render settings.
The built-in modalities' renderers are below (their settings: the world config's `render` section);
a modality added by a modality file registers its own with `@register_renderer(name)` in its adapter
module, or through the `mcomp.world_renderers` entry points of an installed package (its settings:
the file's `demo.render`). Rendering runs on threads, so a renderer registered in this process is
the one used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from mcomp.plugins import WORLD_RENDERERS, Registry
from mcomp.world.entities import Entity, Shape


@dataclasses.dataclass(frozen=True)
class Scene:
    entity: Entity
    shape: Shape  # the entity's shape with its sound (timbre)
    rgb: tuple[int, int, int]
    pitch_hz: float  # the colour's pitch (audio)
    rng: np.random.Generator  # this file's own, seeded from its path
    settings: Mapping[str, Any]


Renderer = Callable[[Scene, str], None]
REGISTRY: Registry[Renderer] = Registry("world renderer", WORLD_RENDERERS)


def register_renderer(modality: str):
    """Decorator: `fn(scene, path)` renders `modality` media."""

    def deco(fn: Renderer) -> Renderer:
        return REGISTRY.add(modality, fn)

    return deco


def renderer(modality: str) -> Renderer:
    fn = REGISTRY.get(modality)
    if fn is None:
        raise ValueError(
            f"the world has no renderer for modality {modality!r} (known: {', '.join(REGISTRY.all())}); "
            f"register one with mcomp.world.renderers.register_renderer"
        )
    return fn


@register_renderer("image")
def _image(scene: Scene, path: str) -> None:
    from mcomp.world import render_image

    pixels, _ = render_image.render_image(scene.entity, scene.rgb, scene.rng, int(scene.settings["image_size"]))
    render_image.write_png(path, pixels)


@register_renderer("audio")
def _audio(scene: Scene, path: str) -> None:
    from mcomp.world import render_audio

    r = scene.settings
    samples, _ = render_audio.render_audio(
        scene.entity, scene.shape.timbre, scene.pitch_hz, scene.rng, int(r["audio_rate"]), float(r["audio_seconds"])
    )
    render_audio.write_wav(path, samples, int(r["audio_rate"]))


@register_renderer("video")
def _video(scene: Scene, path: str) -> None:
    from mcomp.world import render_video

    r = scene.settings
    frames, _ = render_video.render_video(
        scene.entity, scene.rgb, scene.rng, int(r["video_size"]), int(r["video_frames"])
    )
    render_video.write_mp4(path, frames, int(r["video_fps"]))


@register_renderer("point")
def _point(scene: Scene, path: str) -> None:
    from mcomp.world import render_point

    xyz, rgb, _ = render_point.render_point(scene.entity, scene.rgb, scene.rng, int(scene.settings["points"]))
    render_point.write_ply(path, xyz, rgb)
