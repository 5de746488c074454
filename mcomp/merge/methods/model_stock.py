"""Model Stock (Jang et al. 2024) with mergekit's semantics (`model_stock`): per tensor, the mean cosine
between the models' task vectors over all pairs (each cosine's denominator clamped at 1e-6, the cosine
to [−1, 1]) gives t = N·cos / (1 + (N − 1)·cos) (not clamped), and θ = t·mean(θ_i) + (1 − t)·θ0, i.e.
θ0 + t·mean(τ_i). `filter_wise`: one cosine per row along the last dimension instead of one per tensor.
It needs at least two models and takes no per-model weights.

Streamed: each chunk holds whole slices along dim 0, so a filter's row is in one chunk; a tensor's
cosines come from a pass that sums the models' dot products (float64, where mergekit takes float32
norms of the whole tensor: t can differ from its in the last bits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, register


@dataclass
class ModelStockParams(MethodParams):
    filter_wise: bool = False

    def validate(self, n: int) -> None:
        super().validate(n)
        if n < 2:
            raise ValueError("model_stock needs at least two models besides the base")
        if self.weights is not None:
            raise ValueError("model_stock takes no per-model weights (its coefficient comes from the models' angles)")
        if not isinstance(self.filter_wise, bool):
            raise ValueError(f"parameter 'filter_wise' must be true or false, got {self.filter_wise!r}")


class Gram:
    """Σ over the columns of τ_i·τ_j for every pair of models (float64)."""

    def __init__(self, n: int):
        self.values = torch.zeros(n, n, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        self.values += (x @ x.T).cpu()


def mean_cosine(n: int, dot, norm) -> torch.Tensor:
    """The mean over model pairs i < j of their cosine dot(i, j) / (norm(i)·norm(j)), the denominator
    clamped at 1e-6 and the cosine to [−1, 1] (mergekit's)."""
    cosines = [
        (dot(i, j) / (norm(i) * norm(j)).clamp(min=1e-6)).clamp(-1, 1) for i in range(n) for j in range(i + 1, n)
    ]
    return torch.stack(cosines).mean(0)


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    Params = ModelStockParams
    whole_slices = True
    description = "Model Stock: interpolate the models' average toward the base by their angle (mergekit)"

    def num_stages(self) -> int:
        return 0 if self.p.filter_wise else 1

    def reducers(self, stage: int, d: int) -> dict:
        return {"gram": Gram(self.n)}

    def observe(self, stage, tau, chunk, stats, reducers):
        reducers["gram"].update(tau)

    def finish(self, stage, reducers, stats):
        gram = reducers["gram"].values
        norms = gram.diagonal().sqrt()
        stats["cos"] = float(mean_cosine(self.n, lambda i, j: gram[i, j], lambda i: norms[i]))

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        (seg,) = chunk.segments
        shape = seg.shape or (seg.size,)
        if self.p.filter_wise and len(shape) > 0:  # a cosine per row, each row within the chunk
            rows = tau.view(self.n, -1, shape[-1])
            norms = rows.norm(dim=-1)
            cos = mean_cosine(self.n, lambda i, j: (rows[i] * rows[j]).sum(-1), lambda i: norms[i]).unsqueeze(-1)
            mean = rows.mean(0)
        else:
            cos, mean = torch.tensor(stats["cos"], dtype=tau.dtype, device=tau.device), tau.mean(0)
        t = self.n * cos / (1 + (self.n - 1) * cos)
        out = (t * mean).reshape(-1)
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out
