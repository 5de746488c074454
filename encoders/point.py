"""Point-cloud adapter: point files -> [num_points, 6] (xyz + rgb) -> Point-BERT v1.2 -> mlp2x_gelu.

Defaults mirror the published point MLLM of ModelCompose (Point-BERT as in PointLLM, 8192 points,
513 x 384 features, `mlp2x_gelu` projector 384 -> LLM width).

Reading: .ply/.pcd/.xyz/.xyzrgb/.pts through open3d, .npy (N x 3 or N x 6 numeric, no pickles).
Preprocessing, in this order:
1. Colours in [0, 1]. A cloud without colours gets `missing_color` (0.4 grey) on every point. If any
   colour value is above 1 the colours are taken to be 0-255 (common in .npy and .pts files) and
   divided by 255 (`color_range="as_stored"` keeps them as stored, as the released code reads its
   npy files); negative values or values above 255 are an error.
2. Resampling to `num_points`, seeded so a cloud always gives the same result:
   fewer points -> every point once, then the shortfall drawn with replacement (duplicates
   add no new FPS centres); more -> a random subset without replacement (`resample="random"`,
   original order kept) or farthest point sampling (`resample="fps"`, slower, more even).
3. Normalisation: `"none"` keeps the values as stored, which is what the released ModelCompose code
   feeds its encoder (its `pc_norm` is never called); `"unit_sphere"` centres xyz on the mean and
   divides by the largest radius, PointLLM's `pc_norm`, applied to the resampled cloud.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
from typing import Any

import numpy as np
import torch

from mcomp.encoders.pointbert import FPS_START_MODES, PointBert, PointBertConfig, farthest_point_sample
from mcomp.errors import MediaError
from mcomp.modalities import MODALITIES
from mcomp.modality import AdapterConfig, ModalityAdapter, register_modality

logger = logging.getLogger(__name__)

OPEN3D_EXTENSIONS = (".ply", ".pcd", ".xyz", ".xyzrgb", ".pts")
POINT_EXTENSIONS = OPEN3D_EXTENSIONS + (".npy",)
NORMALIZATIONS = ("none", "unit_sphere")
RESAMPLE_METHODS = ("random", "fps")
COLOR_RANGES = ("auto", "as_stored")
# Points a file may declare (about 3 GiB of xyz + rgb as float64 in open3d); raise it for larger clouds.
MAX_POINTS = 1 << 26
# Up to this many declared points open3d's own checks are enough (a few MB allocated at most).
_SMALL_DECLARED_POINTS = 1 << 20
_PLY_TYPE_SIZES = {
    "char": 1,
    "int8": 1,
    "uchar": 1,
    "uint8": 1,
    "short": 2,
    "int16": 2,
    "ushort": 2,
    "uint16": 2,
    "int": 4,
    "int32": 4,
    "uint": 4,
    "uint32": 4,
    "float": 4,
    "float32": 4,
    "double": 8,
    "float64": 8,
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL_TAG = re.compile(r"^\[Open3D \w+\]\s*")


@dataclasses.dataclass
class PointCloudData:
    """A decoded cloud: xyz [N, 3] and rgb [N, 3] in [0, 1] (None if the file has no colours)."""

    xyz: np.ndarray
    rgb: np.ndarray | None = None
    path: str | None = None  # the source file, so later errors can name it


# --- reading ------------------------------------------------------------------------------
def read_point_file(path: str, modality: str = "point", color_range: str = "auto") -> PointCloudData:
    """Decode a point-cloud file; every failure is a MediaError naming the file."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in POINT_EXTENSIONS:
        raise MediaError(
            path,
            f"unsupported point-cloud file extension {ext or '(none)'!r} (supported: {', '.join(POINT_EXTENSIONS)})",
            modality,
        )
    if not os.path.isfile(path):
        raise MediaError(path, "file not found", modality)
    if ext != ".npy":
        check_declared_points(path, ext, modality)
    xyz, rgb = _read_npy(path, modality) if ext == ".npy" else _read_open3d(path, modality)
    return validate_cloud(xyz, rgb, path, modality, color_range)


def _read_header(path: str, end: str, limit: int = 1 << 16) -> list[str] | None:
    """The text lines of a file's header up to the one starting with `end` (None if not in `limit` bytes)."""
    with open(path, "rb") as f:
        head = f.read(limit)
    lines = []
    for raw in head.splitlines():
        lines.append(raw.decode("ascii", errors="replace").strip())
        if lines[-1].startswith(end):
            return lines
    return None


def _declared_points(path: str, ext: str) -> tuple[int, int] | None:
    """(points the header declares, bytes they need at least) for .ply/.pcd/.pts; None if not stated.

    open3d allocates what the header declares before reading any point, so a short file that
    declares a billion points would take tens of GB: the header is checked against the file first.
    """
    if ext == ".ply":
        lines = _read_header(path, "end_header")
        if lines is None:
            return None
        fmt = next((ln.split()[1] for ln in lines if ln.startswith("format ") and len(ln.split()) > 1), "ascii")
        points, need, row, rows = 0, 0, None, []  # row: [count, fixed bytes, fields] of an element
        for ln in lines:
            parts = ln.split()
            if parts[:1] == ["element"] and len(parts) == 3 and parts[2].isdigit():
                row = [int(parts[2]), 0, 0]
                rows.append(row)
                if parts[1] == "vertex":
                    points = int(parts[2])
            elif parts[:1] == ["property"] and row is not None and len(parts) >= 3:
                size = _PLY_TYPE_SIZES.get(parts[2] if parts[1] == "list" else parts[1], 1)
                row[1] += size  # a list holds at least its count
                row[2] += 1
        for count, fixed, fields in rows:
            need += count * (fixed if fmt.startswith("binary") else 2 * fields)  # ascii: a digit and a separator
        return points, need
    if ext == ".pcd":
        lines = _read_header(path, "DATA")
        if lines is None:
            return None
        fields = {ln.split()[0]: ln.split()[1:] for ln in lines if ln and not ln.startswith("#")}
        try:
            points = (
                int(fields["POINTS"][0]) if "POINTS" in fields else int(fields["WIDTH"][0]) * int(fields["HEIGHT"][0])
            )
            sizes = [int(x) for x in fields.get("SIZE", [])]
            counts = [int(x) for x in fields.get("COUNT", [])] or [1] * len(sizes)
        except (KeyError, IndexError, ValueError):
            return None
        kind = (fields.get("DATA") or ["ascii"])[0]
        if kind == "binary":
            return points, points * sum(a * b for a, b in zip(sizes, counts))
        if kind == "ascii":
            return points, points * 2 * sum(counts)
        return points, 0  # binary_compressed: only the point limit applies
    if ext == ".pts":
        with open(path, "rb") as f:
            first = f.readline(64).strip()
        if first.isdigit():  # the count line of the format
            return int(first), int(first) * 6  # "x y z" and a newline at least
    return None


def check_declared_points(path: str, ext: str, modality: str = "point") -> None:
    """Refuse a header that declares more points than MAX_POINTS or than the file can hold."""
    try:
        declared = _declared_points(path, ext)
    except OSError as err:
        raise MediaError(path, f"unreadable point-cloud file ({err})", modality) from None
    if declared is None:
        return
    points, need = declared
    if points > MAX_POINTS:
        raise MediaError(
            path,
            f"the header declares {points} points, over the limit of {MAX_POINTS} "
            f"(mcomp.encoders.point.MAX_POINTS; raise it for larger clouds)",
            modality,
        )
    size = os.path.getsize(path)
    if points > _SMALL_DECLARED_POINTS and need > size:
        raise MediaError(
            path,
            f"corrupt or truncated point-cloud file: the header declares {points} points "
            f"(at least {need} bytes) but the file has {size} bytes",
            modality,
        )


def _read_open3d(path: str, modality: str) -> tuple[np.ndarray, np.ndarray | None]:
    import open3d as o3d

    # open3d reports failures as warnings printed through Python's stdout and returns an empty (or,
    # for a truncated PLY, garbage-filled) cloud: capture the messages at warning level and check them.
    captured = io.StringIO()
    try:
        with (
            o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Warning),
            contextlib.redirect_stdout(captured),
        ):
            cloud = o3d.io.read_point_cloud(path, remove_nan_points=False, remove_infinite_points=False)
    except (RuntimeError, ValueError, OSError) as err:
        raise MediaError(path, f"unreadable point-cloud file ({err})", modality) from None
    messages = [_LEVEL_TAG.sub("", _ANSI.sub("", line).strip()) for line in captured.getvalue().splitlines()]
    messages = [m for m in messages if m]
    failures = [m for m in messages if "fail" in m.lower() or "error" in m.lower()]
    if failures:
        raise MediaError(path, f"corrupt or unreadable point-cloud file (open3d: {'; '.join(failures)})", modality)
    for message in messages:
        logger.debug("open3d while reading %s: %s", path, message)
    xyz = np.asarray(cloud.points, dtype=np.float64)
    if xyz.shape[0] == 0:
        raise MediaError(path, "the file contains no points (empty, or not a valid point-cloud file)", modality)
    rgb = np.asarray(cloud.colors, dtype=np.float64) if cloud.has_colors() else None
    return xyz, rgb


def _check_npy_header(path: str, modality: str) -> None:
    """np.load allocates the declared shape before reading: a short file that declares a huge array
    would take that memory. Compare the header with the file first (formats 1.0 and 2.0)."""
    from numpy.lib import format as npy_format

    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
            reader = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}.get(version)
            if reader is None:
                return  # np.load reports the version
            shape, _, dtype = reader(f)
        except ValueError:
            return  # a malformed header: np.load reports it
        offset = f.tell()
    if dtype.hasobject:
        return  # refused below without reading the objects
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    actual = os.path.getsize(path) - offset
    if declared > actual:
        raise MediaError(
            path,
            f"corrupt or truncated .npy file: the header declares shape {tuple(shape)} of {dtype} "
            f"({declared} bytes) but the file holds {actual} bytes of data",
            modality,
        )


def _read_npy(path: str, modality: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        _check_npy_header(path, modality)
        array = np.load(path, allow_pickle=False)
    except MediaError:  # a ValueError, already worded
        raise
    except ValueError as err:  # object arrays (pickles) and malformed headers
        raise MediaError(path, f"not a plain numeric .npy array ({err})", modality) from None
    except (OSError, EOFError) as err:
        raise MediaError(path, f"corrupt or truncated .npy file ({err})", modality) from None
    if not isinstance(array, np.ndarray):
        raise MediaError(path, f"expected a single .npy array, got {type(array).__name__}", modality)
    if array.dtype.kind not in "fiu":
        raise MediaError(path, f"expected a numeric array, got dtype {array.dtype}", modality)
    if array.ndim != 2 or array.shape[1] not in (3, 6):
        raise MediaError(
            path, f"expected an N x 3 (xyz) or N x 6 (xyz + rgb) array, got shape {tuple(array.shape)}", modality
        )
    array = array.astype(np.float64)
    return array[:, :3], (array[:, 3:] if array.shape[1] == 6 else None)


def validate_cloud(
    xyz: np.ndarray,
    rgb: np.ndarray | None,
    path: str | None = None,
    modality: str = "point",
    color_range: str = "auto",
) -> PointCloudData:
    """Check a cloud; `color_range` "auto" brings its colours to [0, 1] (0-255 colours are detected
    and scaled), "as_stored" keeps them as the file gives them (the released code's reading)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise MediaError(path, f"expected xyz of shape N x 3, got {tuple(xyz.shape)}", modality)
    if xyz.shape[0] == 0:
        raise MediaError(path, "the point cloud has no points", modality)
    bad = ~np.isfinite(xyz).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise MediaError(
            path, f"{int(bad.sum())} point(s) have NaN or infinite coordinates (first: point {first})", modality
        )
    if rgb is not None:
        rgb = np.asarray(rgb, dtype=np.float64)
        if rgb.shape != xyz.shape:
            raise MediaError(path, f"colours have shape {tuple(rgb.shape)} but xyz has {tuple(xyz.shape)}", modality)
        if not np.isfinite(rgb).all():
            raise MediaError(path, "colours contain NaN or infinite values", modality)
        low, high = float(rgb.min()), float(rgb.max())
        if low < 0 or high > 255:
            raise MediaError(path, f"colour values out of range [{low:g}, {high:g}] (expected 0-1 or 0-255)", modality)
        if high > 1 and color_range == "auto":
            logger.debug("%s: colour values up to %g, taken as 0-255 and divided by 255", path or "point cloud", high)
            rgb = rgb / 255.0
    return PointCloudData(xyz, rgb, path)


# --- preprocessing ------------------------------------------------------------------------
def resample_indices(xyz: np.ndarray, num_points: int, method: str, seed: int) -> np.ndarray:
    """Indices of `num_points` points of the cloud, seeded (see the module docstring)."""
    n = xyz.shape[0]
    rng = np.random.default_rng(seed)
    if n == num_points:
        return np.arange(n)
    if n < num_points:
        return np.concatenate([np.arange(n), rng.choice(n, num_points - n, replace=True)])
    if method == "fps":
        start = torch.tensor([int(rng.integers(n))])
        idx = farthest_point_sample(torch.from_numpy(xyz).float()[None], num_points, start)[0]
        return idx.numpy()
    return np.sort(rng.choice(n, num_points, replace=False))


def unit_sphere(xyz: np.ndarray) -> np.ndarray:
    """PointLLM's `pc_norm`: centre on the mean, divide by the largest distance from it."""
    centred = xyz - xyz.mean(axis=0)
    radius = float(np.sqrt((centred**2).sum(axis=1)).max())
    if radius == 0:  # every point coincides: nothing to scale (pc_norm would divide by zero)
        logger.warning("point cloud has all points at one position; unit-sphere scaling skipped")
        return centred
    return centred / radius


def preprocess_cloud(
    cloud: PointCloudData, num_points: int, normalization: str, resample: str, seed: int, missing_color: float
) -> torch.Tensor:
    """[num_points, 6] float32: xyz (normalised as configured) + rgb in [0, 1]."""
    idx = resample_indices(cloud.xyz, num_points, resample, seed)
    xyz = cloud.xyz[idx]
    rgb = cloud.rgb[idx] if cloud.rgb is not None else np.full_like(xyz, missing_color)
    if normalization == "unit_sphere":
        xyz = unit_sphere(xyz)
    return torch.from_numpy(np.concatenate([xyz, rgb], axis=1).astype(np.float32))


# --- adapter ------------------------------------------------------------------------------
@dataclasses.dataclass
class PointAdapterConfig(AdapterConfig):
    adapter: str = "point"
    encoder: PointBertConfig | dict[str, Any] = dataclasses.field(default_factory=PointBertConfig)
    checkpoint: str | None = None  # local Point-BERT weights (e.g. point_bert_v1.2.pt); None = random init
    num_points: int = 8192
    normalization: str = "none"  # "none" (as the released composition code) or "unit_sphere" (PointLLM)
    resample: str = "random"  # how to pick num_points from a larger cloud: "random" or "fps"
    missing_color: float = 0.4  # rgb given to every point of a cloud without colours
    # "auto": 0-255 colours are divided by 255; "as_stored": as the file gives them (released ModelCompose)
    color_range: str = "auto"
    # encoder FPS start: "seeded", "zero", or "random" (upstream; unseeded, so cached features freeze one draw)
    fps_start: str = "seeded"
    seed: int = 0  # for resampling and the seeded FPS start
    projector_type: str = "mlp2x_gelu"

    def __post_init__(self):
        if isinstance(self.encoder, dict):  # from JSON
            self.encoder = PointBertConfig.from_dict(self.encoder, source="point adapter config field 'encoder'")
        if not isinstance(self.encoder, PointBertConfig):
            raise ValueError(f"encoder must be a PointBertConfig or its dict, got {type(self.encoder).__name__}")
        if self.color_range not in COLOR_RANGES:
            raise ValueError(f"color_range must be one of {COLOR_RANGES}, got {self.color_range!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.resample not in RESAMPLE_METHODS:
            raise ValueError(f"resample must be one of {RESAMPLE_METHODS}, got {self.resample!r}")
        if self.fps_start not in FPS_START_MODES:
            raise ValueError(f"fps_start must be one of {FPS_START_MODES}, got {self.fps_start!r}")
        needed = max(self.encoder.num_group, self.encoder.group_size)
        if not isinstance(self.num_points, int) or self.num_points < needed:
            raise ValueError(
                f"num_points must be an integer >= {needed} (the encoder's num_group/group_size), "
                f"got {self.num_points!r}"
            )
        if not 0 <= self.missing_color <= 1:
            raise ValueError(f"missing_color must be in [0, 1], got {self.missing_color!r}")


@register_modality("point")
class PointAdapter(ModalityAdapter):
    modality = "point"
    placeholder = MODALITIES["point"].placeholder
    config_class = PointAdapterConfig

    def build_encoder(self) -> PointBert:
        cfg: PointAdapterConfig = self.config
        encoder = PointBert(cfg.encoder, fps_start=cfg.fps_start, seed=cfg.seed)
        if cfg.checkpoint:
            encoder.load_checkpoint(cfg.checkpoint)
        return encoder

    @property
    def encoder_dim(self) -> int:
        return self.config.encoder.trans_dim

    @property
    def num_tokens(self) -> int:
        return self.config.encoder.num_group + 1

    def load(self, path: str) -> PointCloudData:
        return read_point_file(path, self.modality, self.config.color_range)

    def preprocess(self, raw: Any) -> torch.Tensor:
        """A decoded file, or a cloud in memory: numpy/torch [N, 3] or [N, 6], or an open3d PointCloud."""
        cloud = self._as_cloud(raw)
        cfg: PointAdapterConfig = self.config
        return preprocess_cloud(cloud, cfg.num_points, cfg.normalization, cfg.resample, cfg.seed, cfg.missing_color)

    def _as_cloud(self, raw: Any) -> PointCloudData:
        if isinstance(raw, PointCloudData):
            return raw
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().cpu().double().numpy()
        if isinstance(raw, np.ndarray):
            if raw.ndim != 2 or raw.shape[1] not in (3, 6):
                raise MediaError(
                    None, f"expected an N x 3 or N x 6 point array, got shape {tuple(raw.shape)}", self.modality
                )
            return validate_cloud(
                raw[:, :3], raw[:, 3:] if raw.shape[1] == 6 else None, None, self.modality, self.config.color_range
            )
        if type(raw).__name__ == "PointCloud" and hasattr(raw, "points"):  # open3d, without importing it
            rgb = np.asarray(raw.colors) if raw.has_colors() else None
            return validate_cloud(np.asarray(raw.points), rgb, None, self.modality, self.config.color_range)
        raise MediaError(
            None,
            f"expected a file path, a point array or an open3d PointCloud, got {type(raw).__name__}",
            self.modality,
        )

    def _is_preprocessed(self, tensor: torch.Tensor) -> bool:
        # A torch tensor of exactly [num_points, 6] is taken as already preprocessed (pass numpy for raw clouds).
        return tuple(tensor.shape) == (self.config.num_points, 6)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        return self.encoder(batch)
