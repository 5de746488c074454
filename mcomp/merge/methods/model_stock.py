"""Model Stock (Jang et al. 2024) with mergekit's semantics (`model_stock`): per tensor, the mean cosine
between the models' task vectors over all pairs (each cosine's denominator clamped at 1e-6, the cosine
to [−1, 1]) gives t = N·cos / (1 + (N − 1)·cos) (not clamped), and θ = t·mean(θ_i) + (1 − t)·θ0, i.e.
θ0 + t·mean(τ_i). `filter_wise`: one cosine per row along the last dimension instead of one per tensor.
It needs at least two models and takes no per-model weights."""

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


@register
class ModelStock(MergeMethod):
    name = "model_stock"
    Params = ModelStockParams
    whole_tensors = True
    description = "Model Stock: interpolate the models' average toward the base by their angle (mergekit)"

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        (seg,) = chunk.segments
        shape = seg.shape or (seg.size,)
        rows = tau.view(self.n, -1, shape[-1]) if self.p.filter_wise and len(shape) > 0 else tau.unsqueeze(1)
        cosines = []
        for i in range(self.n):
            for j in range(i + 1, self.n):
                norms = rows[i].norm(dim=-1) * rows[j].norm(dim=-1)
                cosines.append(((rows[i] * rows[j]).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(0).unsqueeze(-1)
        t = self.n * cos / (1 + (self.n - 1) * cos)
        out = (t * rows.mean(0)).reshape(-1)
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out
