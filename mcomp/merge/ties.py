"""TIES-Merging (Yadav et al. 2023) with the released code's exact semantics.

1. trim: per task keep |τ_i| >= the (d − floor(d·density))-th smallest |τ_i| (1-indexed,
   torch.kthvalue), ties kept; density 1 keeps everything (the reference would fail there).
2. elect: s = sign(Σ_i w_i·trimmed_i) ("mass"; "frequency" = sign of Σ_i sign(...)); where that
   is exactly 0, the majority sign sign(Σ_coordinates s) of the scope.
3. disjoint mean of the entries agreeing with s, divided by their count (at least 1). As in the
   reference, agreement is `s > 0 ? x > 0 : x < 0`, so if the majority itself is 0 the zero
   coordinates average their negative entries.
4. θ = θ0 + λ · merged.
Per-model weights w_i multiply the trimmed task vectors before the election (they do not
change the trim, which is scale-invariant per task, and the mean divides by the count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _choice, _number, register
from mcomp.merge.selection import RowQuantiles, RowSum


def elect_signs(t: torch.Tensor, sign: str) -> torch.Tensor:
    """Per-coordinate elected sign (before the zero fix-up)."""
    if sign == "mass":
        return torch.sign(t.sum(0))
    return torch.sign(torch.sign(t).sum(0))


def disjoint_mean(t: torch.Tensor, elected: torch.Tensor, majority: float) -> torch.Tensor:
    """Mean over tasks of the entries whose sign agrees with the elected sign."""
    s = torch.where(elected == 0, torch.full_like(elected, majority), elected)
    keep = torch.where(s.unsqueeze(0) > 0, t > 0, t < 0)
    selected = t * keep
    counts = (selected != 0).sum(0).float()
    return selected.sum(0) / torch.clamp(counts, min=1)


def trim_rank(d: int, density: float) -> int | None:
    """0-indexed rank of the trim threshold in ascending |τ|; None when everything is kept."""
    k = d - int(d * density)
    return None if k <= 0 else k - 1


@dataclass
class TiesParams(MethodParams):
    density: float = 0.2
    scope: str = "global"
    sign: str = "mass"

    def validate(self, n: int) -> None:
        super().validate(n)
        _number(self, "density", 0.0, 1.0, lo_open=True)
        _choice(self, "scope", ("global", "tensor"))
        _choice(self, "sign", ("mass", "frequency"))


@register
class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams
    description = "TIES-Merging: trim, elect sign, disjoint mean"

    def num_stages(self) -> int:
        return 2

    def reducers(self, stage: int, d: int) -> dict:
        if stage == 0:
            r = trim_rank(d, self.p.density)
            return {} if r is None else {"trim": RowQuantiles([[r]] * self.n, d)}
        return {"signs": RowSum(1)}

    def _trimmed(self, tau: torch.Tensor, stats: dict) -> torch.Tensor:
        thr = stats.get("threshold_values")
        if thr is None:
            t = tau
        else:
            column = torch.tensor(thr, dtype=tau.dtype, device=tau.device).unsqueeze(1)
            t = tau * (tau.abs() >= column)
        w = self.weights_column(tau)
        return t if w is None else t * w

    def observe(self, stage, tau, chunk, stats, reducers):
        if stage == 0:
            if "trim" in reducers:
                reducers["trim"].update(tau.abs())
        else:
            reducers["signs"].update(elect_signs(self._trimmed(tau, stats), self.p.sign).unsqueeze(0))

    def finish(self, stage, reducers, stats):
        if stage == 0:
            if "trim" in reducers:
                q = reducers["trim"]
                r = q.targets[0].rank
                stats["threshold_values"] = [q.value(i, r) for i in range(self.n)]
        else:
            total = reducers["signs"].result()[0]
            stats["majority"] = float((total > 0) - (total < 0))

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        t = self._trimmed(tau, stats)
        out = disjoint_mean(t, elect_signs(t, self.p.sign), stats["majority"])
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out
