"""PCB-Merging (Du et al., NeurIPS 2024) with the released code's exact semantics.

Per task i over the scope (d coordinates), with a_i = |τ_i|:
1. clip a_i to [lo_i, hi_i] = sorted(a_i)[floor(d·clip)], sorted(a_i)[floor(d·(1−clip)) − 1];
   τ̃_i = sign(τ_i)·a_i.
2. N_i = (a_i − lo_i)/(hi_i − lo_i).
3. intra: exp(n·N_i²).
4. inter: v1 tanh(τ_i ⊙ Σ_j τ_j); v2 tanh(τ_i ⊙ Σ_j τ̂_j), τ̂_j = sign(τ_j)·N_j;
   v3 Σ_j tanh(τ̂_i ⊙ τ̂_j).
5. β_i = intra ⊙ inter.
6. t_i = sorted(β_i)[floor(d·(1−ratio))], m_i = max β_i; s_i = (clamp(β_i, t_i, m_i) − t_i)/(m_i − t_i).
7. τ_m = Σ_i λ_i s_i τ̃_i / max(Σ_i s_i, 1e-12); θ = θ0 + λ·τ_m.

Defect guard (documented difference from the reference): both normalisers divide by a range
with no epsilon, so a constant row gives 0/0 = NaN there. Here a zero range gives all-zero
normalised values: N_i = 0 (intra = 1) in step 2, and s_i = 0 (the task contributes nothing)
in step 6. Rows with a non-zero range are computed exactly as the reference does.

Streaming: the four per-task scalars (lo, hi, t, m) are exact order statistics found by
`mcomp.merge.selection`; everything else is per coordinate. Stage 0 finds lo/hi over |τ|, stage 1
finds t/m over β, then the merge pass recomputes β chunk by chunk. This module is the rule; the
fused native kernels, stored-dtype reads and the merge pass's candidate columns are its
acceleration (`mcomp.merge.accelerated.pcb`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mcomp.merge.kernels import Workspace, exp_, scratch, tanh_
from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _choice, _number, register
from mcomp.merge.selection import RowMax, RowQuantiles


def clip_ranks(d: int, clip: float) -> tuple[int, int]:
    """Reference indices: int(d * min_ratio) and int(d * (1 - max_ratio) - 1)."""
    return int(d * clip), max(int(d * (1 - clip) - 1), 0)


def threshold_rank(d: int, ratio: float) -> int:
    """Reference index of the β threshold: int(d * (1 - ratio))."""
    return min(int(d * (1 - ratio)), d - 1)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def clip(tau: torch.Tensor, lo: list[float], hi: list[float], workspace: Workspace | None = None) -> torch.Tensor:
    """a = clamp(|τ|, lo, hi), row by row."""
    a = torch.abs(tau, out=scratch(workspace, "pcb.a", tau.shape, tau))
    for i in range(tau.shape[0]):  # per row: scalar bounds clamp ~10x faster than tensor bounds
        a[i].clamp_(lo[i], hi[i])
    return a


def clip_and_normalise(
    tau: torch.Tensor, lo: list[float], hi: list[float], workspace: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, N): clipped magnitudes and their min–max normalisation (zero range -> 0)."""
    lo_col = _column(lo, tau)
    a = clip(tau, lo, hi, workspace)
    norm = torch.sub(a, lo_col, out=scratch(workspace, "pcb.norm", tau.shape, tau))
    norm.div_(torch.sub(_column(hi, tau), lo_col))
    for i in range(tau.shape[0]):
        if not hi[i] > lo[i]:
            norm[i].zero_()
    return a, norm


def balance(tau: torch.Tensor, norm: torch.Tensor, inter: str, workspace: Workspace | None = None) -> torch.Tensor:
    """β = exp(n·N²) ⊙ inter-balancing. Consumes `norm` (β is returned in its storage)."""
    n = tau.shape[0]
    cross = scratch(workspace, "pcb.cross", tau.shape, tau)
    if inter == "v1":
        tanh_(torch.mul(tau, tau.sum(0), out=cross))
    else:
        hat = torch.sign(tau, out=scratch(workspace, "pcb.hat", tau.shape, tau)).mul_(norm)
        if inter == "v2":
            tanh_(torch.mul(tau, hat.sum(0), out=cross))
        else:
            tanh_(torch.mul(hat, hat[0], out=cross))
            term = scratch(workspace, "pcb.term", tau.shape, tau)
            for j in range(1, n):
                cross.add_(tanh_(torch.mul(hat, hat[j], out=term)))
    intra = exp_(norm.square_().mul_(n))
    return intra.mul_(cross)


def scores_from_beta(beta: torch.Tensor, t: list[float], m: list[float]) -> torch.Tensor:
    """s_i = (clamp(β_i, t_i, m_i) − t_i)/(m_i − t_i), in place; a zero range gives s_i = 0."""
    t_col = _column(t, beta)
    m_col = _column(m, beta)
    for i in range(beta.shape[0]):
        beta[i].clamp_(t[i], m[i])
    s = beta.sub_(t_col).div_(m_col.sub_(t_col))
    for i in range(beta.shape[0]):
        if not m[i] > t[i]:
            s[i].zero_()
    return s


def combine(
    clipped: torch.Tensor, s: torch.Tensor, weights: list[float] | None, scale: float, inplace: bool = False
) -> torch.Tensor:
    """Step 7: Σ λ_i s_i τ̃_i / max(Σ s_i, 1e-12), times λ. `inplace` overwrites `clipped`."""
    num = clipped.mul_(s) if inplace else clipped * s
    if weights is not None:
        num.mul_(torch.tensor(weights, dtype=num.dtype, device=num.device).unsqueeze(1))
    out = num.sum(0).div_(torch.clamp(s.sum(0), min=1e-12))
    return out.mul_(scale) if scale != 1.0 else out


@dataclass
class PcbParams(MethodParams):
    ratio: float = 0.1
    clip: float = 0.01
    inter: str = "v1"
    scope: str = "global"

    def validate(self, n: int) -> None:
        super().validate(n)
        _number(self, "ratio", 0.0, 1.0, lo_open=True)
        _number(self, "clip", 0.0, 0.5, hi_open=True)
        _choice(self, "inter", ("v1", "v2", "v3"))
        _choice(self, "scope", ("global", "tensor"))


@register
class Pcb(MergeMethod):
    name = "pcb"
    Params = PcbParams
    description = "PCB-Merging: clip, intra/inter balancing, drop and rescale, weighted mean"

    def num_stages(self) -> int:
        return 2

    def reducers(self, stage: int, d: int) -> dict:
        if stage == 0:
            lo, hi = clip_ranks(d, self.p.clip)
            return {"clip": RowQuantiles([[lo, hi]] * self.n, d)}
        return {"threshold": RowQuantiles([[threshold_rank(d, self.p.ratio)]] * self.n, d), "max": RowMax(self.n)}

    def observe(self, stage, tau, chunk, stats, reducers):
        if stage == 0:
            reducers["clip"].update(tau.abs())
            return
        _, norm = clip_and_normalise(tau, stats["lo"], stats["hi"])
        beta = balance(tau, norm, self.p.inter)
        reducers["threshold"].update(beta)
        reducers["max"].update(beta)

    def finish(self, stage, reducers, stats):
        if stage == 0:
            q = reducers["clip"]
            lo_r, hi_r = q.targets[0].rank, q.targets[1].rank
            stats["lo"] = [q.value(i, lo_r) for i in range(self.n)]
            stats["hi"] = [q.value(i, hi_r) for i in range(self.n)]
        else:
            q = reducers["threshold"]
            r = q.targets[0].rank
            stats["t"] = [q.value(i, r) for i in range(self.n)]
            stats["m"] = reducers["max"].result()

    def scores(self, tau: torch.Tensor, stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, τ̃): the λ-independent part of the merge (reused across coefficient search)."""
        a, norm = clip_and_normalise(tau, stats["lo"], stats["hi"])
        s = scores_from_beta(balance(tau, norm, self.p.inter), stats["t"], stats["m"])
        return s, torch.sign(tau).mul_(a)

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        s, clipped = self.scores(tau, stats)
        return combine(clipped, s, list(self.p.weights) if self.p.weights is not None else None, self.p.scale)
