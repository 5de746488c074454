"""Consensus merging with TALL masks (Wang, Dimitriadis et al. 2024), exact to nik-dim/tall_masks
(`generate_task_masks`, `construct_consensus_mask`):

1. the multi-task vector τ_MTL: the sum Σ_i w_i τ_i (`multi_task: sum`, the release's default), or TIES
   with the trimmed, sign-agreeing entries summed rather than averaged (`multi_task: ties`, the release's
   `use_ties`: top `density` = 20% per task over the whole model, mass sign election with the
   model-wide majority where the sum is 0);
2. each task's TALL mask m_t = |τ_t| > λ_t · |τ_MTL − τ_t| (strict), λ_t from `lambdas` (one value for
   every task or one per task; the release picks each task's from 0.2…0.6 on its validation set);
3. the consensus mask keeps the coordinates where at least `min_agree` tasks' masks are on (default 2);
4. θ = θ0 + scale · (mask ⊙ τ_MTL) (the release picks scale from 0.1…1.0 on validation data).
Elementwise apart from the TIES trim and majority, which are model-wide (scope global), as released.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcomp.merge.methods.family import TaskArithmeticFamily, disjoint_sum, elect_signs
from mcomp.merge.registry import Chunk, MethodParams, _choice, _count, _number, register


@dataclass
class ConsensusParams(MethodParams):
    lambdas: float | tuple[float, ...] = 0.4
    min_agree: int = 2
    multi_task: str = "sum"
    density: float = 0.2  # the TIES trim of multi_task: ties
    scope: str = "global"
    sign: str = "mass"

    def validate(self, n: int) -> None:
        super().validate(n)
        _choice(self, "multi_task", ("sum", "ties"))
        _number(self, "density", 0.0, 1.0, lo_open=True)
        _choice(self, "scope", ("global", "tensor"))
        _choice(self, "sign", ("mass", "frequency"))
        values = self.lambdas if isinstance(self.lambdas, (list, tuple)) else [self.lambdas] * n
        if len(values) != n or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise ValueError(f"parameter 'lambdas' must be a number or {n} numbers, got {self.lambdas!r}")
        self.lambdas = tuple(float(v) for v in values)
        _count(self, "min_agree")


@register
class Consensus(TaskArithmeticFamily):
    name = "consensus"
    Params = ConsensusParams
    description = "Consensus merging: keep the coordinates that TALL masks of min_agree tasks select"

    def __init__(self, params, n):
        if params.multi_task == "ties":  # the family's TIES trim and election
            self.sparsify, self.consensus = "magnitude", "sign"
        super().__init__(params, n)

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        if self.p.multi_task == "ties":
            t = self.sparsified(tau, chunk, stats)
            multi = disjoint_sum(t, elect_signs(t, self.p.sign), stats["majority"])
        else:
            w = self.weights_column(tau)
            multi = (tau if w is None else tau * w).sum(0)
        lambdas = torch.tensor(self.p.lambdas, dtype=tau.dtype, device=tau.device).unsqueeze(1)
        masks = tau.abs() > lambdas * (multi - tau).abs()
        keep = masks.sum(0) >= self.p.min_agree
        out = multi * keep
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out
