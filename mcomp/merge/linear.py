"""Task arithmetic and the linear (weighted) average: θ = θ0 + λ · Σ_i w_i τ_i."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, register


def weighted_sum(tau: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Σ_i w_i τ_i, accumulated in model order (float32)."""
    out = tau[0] * weights[0]
    for i in range(1, tau.shape[0]):
        out.add_(tau[i], alpha=weights[i])
    return out


@dataclass
class TaskArithmeticParams(MethodParams):
    """w_i default 1, λ default 1 (no normalisation: Σ of task vectors)."""


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    Params = TaskArithmeticParams
    description = "θ0 + λ Σ w_i τ_i (Ilharco et al. 2023)"

    def coefficients(self) -> list[float]:
        return self.p.weight_list(self.n)

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        out = weighted_sum(tau, self.coefficients())
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out


@dataclass
class LinearParams(MethodParams):
    """Weighted average: w_i are normalised to sum to 1 (mergekit `linear`); equal weights by default."""

    def validate(self, n: int) -> None:
        super().validate(n)
        if abs(sum(self.weight_list(n))) < 1e-12:
            raise ValueError("parameter 'weights' sums to 0: a weighted average needs a non-zero total")


@register
class Linear(TaskArithmetic):
    name = "linear"
    Params = LinearParams
    description = "weighted average θ0 + λ Σ (w_i/Σw) τ_i = Σ (w_i/Σw) θ_i for λ = 1"

    def coefficients(self) -> list[float]:
        w = self.p.weight_list(self.n)
        return [x / sum(w) for x in w]
