"""Point clouds: points on the surface of the shape's open3d mesh, coloured with the entity's colour.

Meshes (unit size, centred): open3d `create_box`, `create_sphere`, `create_cone`, `create_cylinder`,
`create_torus`. Points are drawn with numpy (area-weighted triangle choice, uniform barycentric
coordinates) from the file's own seeded generator, so clouds are reproducible (open3d's own sampler
takes no seed). Distractors: scale, yaw (any), tilt (+-20 degrees), offset, positional jitter,
colour noise. Written as binary little-endian PLY (float xyz, uchar rgb) by hand: fixed header,
same points, same bytes; open3d reads it back (`mcomp.encoders.point.read_point_file`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from mcomp.world.entities import Entity

SHAPES = ("cube", "sphere", "cone", "cylinder", "torus")


@functools.lru_cache(maxsize=None)
def mesh_arrays(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """(vertices [V, 3], triangles [T, 3]) of the shape's mesh, about 1 unit across, centred at 0."""
    import open3d as o3d

    g = o3d.geometry.TriangleMesh
    if shape == "cube":
        mesh = g.create_box(1.0, 1.0, 1.0)
    elif shape == "sphere":
        mesh = g.create_sphere(radius=0.5, resolution=20)
    elif shape == "cone":
        mesh = g.create_cone(radius=0.5, height=1.0, resolution=32)
    elif shape == "cylinder":
        mesh = g.create_cylinder(radius=0.35, height=1.0, resolution=32)
    elif shape == "torus":
        mesh = g.create_torus(torus_radius=0.35, tube_radius=0.15, radial_resolution=40, tubular_resolution=20)
    else:
        raise ValueError(f"no mesh for shape {shape!r} (expected one of {SHAPES})")
    vertices = np.asarray(mesh.vertices, dtype=np.float64).copy()
    triangles = np.asarray(mesh.triangles, dtype=np.int64).copy()
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    vertices -= (lo + hi) / 2  # centre the bounding box
    return vertices, triangles


def sample_surface(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    vertices, triangles = mesh_arrays(shape)
    a, b, c = (vertices[triangles[:, i]] for i in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    tri = rng.choice(len(triangles), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    return a[tri] + u[:, None] * (b[tri] - a[tri]) + v[:, None] * (c[tri] - a[tri])


def rotation(yaw: float, tilt: float) -> np.ndarray:
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(tilt), np.sin(tilt)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rx @ rz


def sample_params(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "scale": float(rng.uniform(0.7, 1.3)),
        "yaw": float(rng.uniform(0, 2 * np.pi)),
        "tilt": float(np.radians(rng.uniform(-20, 20))),
        "offset": [float(v) for v in rng.uniform(-0.1, 0.1, size=3)],
        "jitter": float(rng.uniform(0.003, 0.015)),
        "colour_noise": float(rng.uniform(0.0, 0.04)),
        "points_seed": int(rng.integers(2**31)),
    }


def render_point(
    entity: Entity, rgb, rng: np.random.Generator, n: int = 1024
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """xyz [n, 3] float32 and rgb [n, 3] uint8, and the distractor values used."""
    p = sample_params(rng)
    prng = np.random.default_rng(p["points_seed"])
    xyz = sample_surface(entity.shape, n, prng)
    xyz = xyz @ rotation(p["yaw"], p["tilt"]).T * p["scale"] + np.asarray(p["offset"])
    xyz = xyz + prng.normal(0.0, p["jitter"], xyz.shape)
    colours = np.asarray(rgb, dtype=np.float64)[None, :] / 255.0 + prng.normal(0.0, p["colour_noise"], (n, 3))
    colours = np.clip(np.round(colours * 255.0), 0, 255).astype(np.uint8)
    return xyz.astype(np.float32), colours, p


def write_ply(path: str, xyz: np.ndarray, rgb: np.ndarray) -> None:
    n = len(xyz)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {n}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "end_header\n"
    ).encode("ascii")
    record = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
    data = np.empty(n, dtype=record)
    data["x"], data["y"], data["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    data["r"], data["g"], data["b"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    with open(path, "wb") as f:
        f.write(header)
        f.write(data.tobytes())
