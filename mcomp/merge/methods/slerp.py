"""SLERP with mergekit's semantics (`slerp`): between the base (t = 0) and exactly one other model (t = 1),
each tensor taken as one vector. The angle comes from the normalised copies (norms above 1e-8), and the
sine weights apply to the originals; where |cos| > 0.9995 the tensors are interpolated linearly instead.
All in float32, as mergekit computes it in numpy float32. The merged delta is slerp(θ0, θ1) − θ0 (times
`scale`, default 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _number, register

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    def normalised(v: torch.Tensor) -> torch.Tensor:
        norm = v.norm()
        return v / norm if norm > NORM_EPS else v

    dot = float((normalised(v0) * normalised(v1)).sum())
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    return (math.sin(theta - theta * t) / sin_theta) * v0 + (math.sin(theta * t) / sin_theta) * v1


@dataclass
class SlerpParams(MethodParams):
    t: float = 0.5

    def validate(self, n: int) -> None:
        super().validate(n)
        if self.weights is not None:
            raise ValueError("slerp takes no per-model weights: `t` places the result between the two models")
        _number(self, "t")


@register
class Slerp(MergeMethod):
    name = "slerp"
    Params = SlerpParams
    whole_tensors = True
    uses_base = True
    model_count = 1
    description = "spherical interpolation between the base and one model (mergekit)"

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict, base: torch.Tensor | None = None) -> torch.Tensor:
        v0 = base if base is not None else torch.zeros_like(tau[0])
        out = slerp(self.p.t, v0, v0 + tau[0]) - v0
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out
