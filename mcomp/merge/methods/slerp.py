"""SLERP with mergekit's semantics (`slerp`): between the base (t = 0) and exactly one other model (t = 1),
each tensor taken as one vector. The angle comes from the normalised copies (norms above 1e-8), and the
sine weights apply to the originals; where |cos| > 0.9995 the tensors are interpolated linearly instead.
All in float32, as mergekit computes it in numpy float32, but the angle: streamed, the norms and the dot
product come from a pass over the tensor's chunks, summed in float64 (mergekit's whole-tensor float32
sums can differ in the last bits). The merged delta is slerp(θ0, θ1) − θ0 (times `scale`, default 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _number, register

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


class Products:
    """Σ v0², Σ v1², Σ v0·v1 over a tensor's chunks (float64)."""

    def __init__(self):
        self.values = torch.zeros(3, dtype=torch.float64)

    def update(self, v0: torch.Tensor, v1: torch.Tensor) -> None:
        v0, v1 = v0.double(), v1.double()
        self.values += torch.stack([(v0 * v0).sum(), (v1 * v1).sum(), (v0 * v1).sum()]).cpu()

    def cosine(self) -> float:
        """The dot product of v0 and v1 each divided by its norm where that exceeds NORM_EPS."""
        s00, s11, s01 = self.values.tolist()
        n0, n1 = math.sqrt(s00), math.sqrt(s11)
        return s01 / (n0 if n0 > NORM_EPS else 1.0) / (n1 if n1 > NORM_EPS else 1.0)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot: float) -> torch.Tensor:
    """mergekit's slerp of v0 and v1, given the cosine `dot` of the whole tensors (`Products.cosine`)."""
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
    uses_base = True
    model_count = 1
    description = "spherical interpolation between the base and one model (mergekit)"

    def num_stages(self) -> int:
        return 1

    def reducers(self, stage: int, d: int) -> dict:
        return {"products": Products()}

    def observe(self, stage, tau, chunk, stats, reducers, base: torch.Tensor | None = None):
        v0 = base if base is not None else torch.zeros_like(tau[0])
        reducers["products"].update(v0, v0 + tau[0])

    def finish(self, stage, reducers, stats):
        stats["dot"] = reducers["products"].cosine()

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict, base: torch.Tensor | None = None) -> torch.Tensor:
        v0 = base if base is not None else torch.zeros_like(tau[0])
        out = slerp(self.p.t, v0, v0 + tau[0], stats["dot"]) - v0
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out
