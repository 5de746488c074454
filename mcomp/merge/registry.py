"""Merge methods as small registered units: a name, a typed parameter dataclass, and the maths.

A method sees task vectors a chunk at a time: an (n, C) float32 matrix τ whose row i holds C
coordinates of task i. It declares the statistics it needs as *stages* (each stage: a few
reducers fed by `observe`, e.g. exact order statistics of |τ_i| over the whole model), and
then maps each chunk to the merged delta with `merge`. Every statistic the methods use is
per coordinate or a per-task scalar, so this shape fits all of them, and the same code runs
in memory (one chunk holding everything) and streaming from disk (many chunks, a few passes).
The interface is the maths alone; faster implementations of a method (native kernels, stored
dtypes, scratch buffers) are accelerations behind it (`mcomp.merge.acceleration`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mcomp.plugins import MERGE_METHODS, Registry

if TYPE_CHECKING:
    from mcomp.merge.sources import LowRank

SCOPES = ("global", "tensor")


@dataclass(frozen=True)
class Segment:
    """Flat elements [start, stop) of tensor `name` (`shape`: the shape they form, given to whole-tensor and
    whole-slice methods)."""

    name: str
    start: int
    stop: int
    shape: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Chunk:
    """A unit of work: one or more segments laid end to end (the columns of τ)."""

    segments: tuple[Segment, ...]
    index: int = 0

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)


@dataclass
class MethodParams:
    """Parameters every method takes. `weights`: per-model λ_i (default 1 each); `scale`: outer λ."""

    weights: tuple[float, ...] | None = None
    scale: float = 1.0

    def validate(self, n: int) -> None:
        if self.weights is not None:
            try:
                self.weights = tuple(float(w) for w in self.weights)
            except (TypeError, ValueError):
                raise ValueError(f"parameter 'weights' must be a list of numbers, got {self.weights!r}") from None
            if len(self.weights) != n:
                raise ValueError(f"parameter 'weights' has {len(self.weights)} value(s) for {n} model(s)")
            bad = [w for w in self.weights if not math.isfinite(w)]
            if bad:
                raise ValueError(f"parameter 'weights' must be finite, got {list(self.weights)}")
        _number(self, "scale")

    def weight_list(self, n: int) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * n


def _number(
    p: Any, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> float:
    value = getattr(p, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"parameter {name!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"parameter {name!r} must be finite, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(
            f"parameter {name!r} = {value} is out of range {'(' if lo_open else '['}{lo}, "
            f"{hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
        )
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(
            f"parameter {name!r} = {value} is out of range {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        )
    setattr(p, name, value)
    return value


def _count(p: Any, name: str) -> int:
    value = getattr(p, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"parameter {name!r} must be a non-negative integer, got {value!r}")
    return value


def _choice(p: Any, name: str, choices: tuple[str, ...]) -> str:
    value = getattr(p, name)
    if value not in choices:
        raise ValueError(f"parameter {name!r} must be one of {list(choices)}, got {value!r}")
    return value


class MergeMethod:
    """Base class. Subclasses set `name`, `Params`, and implement the hooks below.

    `whole_tensors`: every chunk holds exactly one whole tensor, its shape in the segment (methods whose
    maths is per matrix: SVDs, sorts, norms); memory is then the largest tensor × models. `whole_slices`: every
    chunk holds whole slices along dim 0 of one tensor (a 1-D tensor whole), its shape in the segment (methods
    whose maths is along the other dimensions, e.g. ranks along dim 1).
    `uses_base`: `merge` and `observe` also receive θ0 of the chunk (`base=`), for methods defined on the
    weights themselves rather than on task vectors (SLERP). `takes_factors`: the method can use low-rank task
    vectors' factors (LoRA): the engine sets `low_rank_inputs(name)`, every model's `LowRank` of that tensor
    or None unless all have one, and callers holding LoRA updates pass them as factors. Parameters are named
    as in mergekit where it has the method; its `lambda` is `scale` (a Python keyword), and `make_params`
    takes either."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    description: ClassVar[str] = ""
    whole_tensors: ClassVar[bool] = False
    whole_slices: ClassVar[bool] = False
    uses_base: ClassVar[bool] = False
    model_count: ClassVar[int | None] = None  # exactly this many models besides the base (SLERP: 1)
    takes_factors: ClassVar[bool] = False

    def __init__(self, params: MethodParams, n: int):
        self.p = params
        self.n = n
        self.low_rank_inputs: Callable[[str], list[LowRank] | None] = lambda name: None

    def scope(self) -> str:
        """`global` (statistics over all merged tensors) or `tensor` (per tensor)."""
        return getattr(self.p, "scope", "tensor")

    def num_stages(self) -> int:
        return 0

    def reducers(self, stage: int, d: int) -> dict[str, Any]:
        """The reducers of `stage` for a group of d coordinates per task."""
        return {}

    def observe(self, stage: int, tau: torch.Tensor, chunk: Chunk, stats: dict, reducers: dict) -> None:
        """Feed the reducers with this chunk's values."""

    def finish(self, stage: int, reducers: dict, stats: dict) -> None:
        """Turn the reducers of `stage` into entries of `stats` (used by later stages and merge)."""

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        """The merged delta (outer scale included) for this chunk: shape (C,)."""
        raise NotImplementedError

    def weights_column(self, tau: torch.Tensor) -> torch.Tensor | None:
        if self.p.weights is None:
            return None
        return torch.tensor(self.p.weights, dtype=tau.dtype, device=tau.device).unsqueeze(1)


REGISTRY: Registry[type[MergeMethod]] = Registry("merge method", MERGE_METHODS, named=lambda cls: cls.name)


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    return REGISTRY.add(cls.name, cls)


def available_methods() -> dict[str, type[MergeMethod]]:
    return REGISTRY.all()


def get_method(name: str) -> type[MergeMethod]:
    cls = REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown merge method {name!r}; available: {sorted(REGISTRY.all())}")
    return cls


def make_params(method: str | type[MergeMethod], n: int, **params: Any) -> MethodParams:
    """Build and validate the parameter dataclass of `method` for n models."""
    cls = get_method(method) if isinstance(method, str) else method
    if cls.model_count is not None and n != cls.model_count:
        raise ValueError(
            f"merge method {cls.name!r} takes exactly {cls.model_count} model(s) besides the base, got {n}"
        )
    if "lambda" in params:
        if params.get("scale") is not None:
            raise ValueError("give 'lambda' or 'scale' (the same outer coefficient), not both")
        params = dict(params)
        params["scale"] = params.pop("lambda")
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    unknown = sorted(k for k in params if k not in fields)
    if unknown:
        raise ValueError(f"merge method {cls.name!r} has no parameter(s) {unknown}; its parameters: {sorted(fields)}")
    p = cls.Params(**{k: v for k, v in params.items() if v is not None})
    p.validate(n)
    return p
