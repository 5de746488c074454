"""Model Breadcrumbs and DELLA with mergekit's semantics and parameter names (mergekit's generalized task
arithmetic, `sparsify.py`): per tensor, each task vector is sparsified, multiplied by its weight, then
either summed or passed through mergekit's sign consensus, optionally normalised, scaled by λ.

    breadcrumbs       magnitude_outliers, no consensus, normalize false
    breadcrumbs_ties  magnitude_outliers, sign consensus, normalize false
    della             della_magprune,     sign consensus, normalize true,  rescale true
    della_linear      della_magprune,     no consensus,   normalize false, rescale true

Sparsifiers (per model, the whole tensor; `density >= 1` leaves it unchanged):
* magnitude_outliers (Breadcrumbs): sort |τ| ascending; drop the int(gamma·N) largest (outliers) and the
  smallest, keeping int(density·N) entries (the outlier cut shrinks when both do not fit). Deviation, on
  purpose: mergekit keeps nothing when the outlier cut is 0 (an empty `[n_bot:-0]` slice: fewer than
  1/gamma elements, or gamma 0); here the cut is then simply empty and the kept entries are kept.
* della_magprune (DELLA): along dim 1 (a 1-D tensor is one row) entries are ranked by |τ| (1 = smallest),
  kept with probability density − ε + 2ε·(rank − 1)/(n − 1); a row of one entry keeps it with
  probability `density`, where mergekit divides 0 by 0. Draws: mcomp's reproducible per-(tensor, model)
  streams (`family.MaskStream`), where mergekit draws from torch's global generator.
* rescale: the kept entries are multiplied by ||τ||₁ / ||kept||₁ of the tensor (mergekit's l1 rescale,
  not the paper's 1/p), unless either norm is below 1e-7.

Sign consensus (mergekit "sum"): the elected sign is + where Σ_i w_i τ_i ≥ 0, else −; an entry counts where
its weighted value has that sign (so pruned or zero-weight entries never count); `normalize` divides by
Σ_i w_i over the counted entries (1 where none), or without consensus by Σ_i w_i (1 where |Σ| < 1e-8).
`lambda` (mcomp's `scale`) multiplies the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mcomp.merge.methods.family import MaskStream
from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _count, _number, register

RESCALE_EPS = 1e-7


def l1_rescaled(tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kept = tau * mask
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def rank_band(values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The entries of 1-D `values` whose rank in ascending order is in [start, stop), equal values ranked
    by position (a stable sort's order), found in linear time: two order statistics bound the band,
    and only the entries equal to a bound are told apart by position."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    if stop <= start:
        return mask
    lo = values.kthvalue(start + 1).values
    hi = values.kthvalue(stop).values
    mask |= (values > lo) & (values < hi)
    for bound in (lo, hi) if lo != hi else (lo,):
        positions = torch.nonzero(values == bound).flatten()  # in position order
        rank = int((values < bound).sum()) + torch.arange(positions.numel(), device=values.device)
        mask[positions[(rank >= start) & (rank < stop)]] = True
    return mask


def outlier_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: keep int(density·N) entries of |τ| after dropping the int(gamma·N) largest."""
    numel = tau.numel()
    keep = int(density * numel)
    top = int(gamma * numel)
    bottom = numel - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    return rank_band(tau.abs().reshape(-1), bottom, numel - top).view_as(tau).to(tau.dtype)


def rank_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities, linear in the rank of |τ| along dim 1 (a 1-D tensor is one row)."""
    t = tau.unsqueeze(0) if tau.dim() < 2 else tau
    length = t.shape[1]
    order = torch.argsort(t.abs(), dim=1, stable=True)
    steps = torch.arange(length, dtype=tau.dtype, device=tau.device).view(1, length, *([1] * (t.dim() - 2)))
    ranks = torch.empty_like(t).scatter_(1, order, steps.expand_as(t))  # 0 = smallest
    spread = ranks / (length - 1) if length > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + spread * 2 * epsilon).reshape(tau.shape)


@dataclass
class GtaParams(MethodParams):
    """mergekit's parameters: `density` (kept fraction), `normalize`, `rescale`; `scale` is mergekit's
    `lambda` and `weights` its per-model `weight`."""

    density: float = 1.0
    normalize: bool = False
    rescale: bool = False

    def validate(self, n: int) -> None:
        super().validate(n)
        _number(self, "density", 0.0, 1.0)
        for name in ("normalize", "rescale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"parameter {name!r} must be true or false, got {getattr(self, name)!r}")


@dataclass
class BreadcrumbsParams(GtaParams):
    gamma: float = 0.01

    def validate(self, n: int) -> None:
        super().validate(n)
        _number(self, "gamma", 0.0, 1.0)


@dataclass
class DellaParams(GtaParams):
    epsilon: float = 0.15
    rescale: bool = True
    seed: int = 0

    def validate(self, n: int) -> None:
        super().validate(n)
        _number(self, "epsilon", 0.0, 1.0)
        if self.density < 1 and not (self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(
                f"DELLA needs 0 < density − epsilon and density + epsilon < 1, got density {self.density}, "
                f"epsilon {self.epsilon}"
            )
        _count(self, "seed")


@dataclass
class DellaTiesParams(DellaParams):
    normalize: bool = True


class GeneralizedTaskArithmetic(MergeMethod):
    """sparsify → weight → (sign consensus) → sum → (normalise) → λ, per tensor."""

    whole_tensors = True
    consensus: ClassVar[bool] = False

    def sparsify(self, tau: torch.Tensor, name: str, model: int) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        (seg,) = chunk.segments
        shape = seg.shape or (seg.size,)
        deltas = tau
        if self.p.density < 1:
            deltas = torch.stack([self.sparsify(tau[i].view(shape), seg.name, i).reshape(-1) for i in range(self.n)])
        w = torch.tensor(self.p.weight_list(self.n), dtype=tau.dtype, device=tau.device).unsqueeze(1)
        weighted = deltas * w
        if self.consensus:
            majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(tau.dtype)
            mask = (weighted.sign() == majority).to(tau.dtype)
            mixed = (weighted * mask).sum(0)
            divisor = (w * mask).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = weighted.sum(0)
            divisor = w.sum()
            if divisor.abs() < 1e-8:
                divisor = torch.ones_like(divisor)
        if self.p.normalize:
            mixed = mixed / divisor
        return mixed * self.p.scale if self.p.scale != 1.0 else mixed


class BreadcrumbsFamily(GeneralizedTaskArithmetic):
    Params = BreadcrumbsParams

    def sparsify(self, tau, name, model):
        mask = outlier_mask(tau, self.p.density, self.p.gamma)
        return l1_rescaled(tau, mask) if self.p.rescale else tau * mask


class DellaFamily(GeneralizedTaskArithmetic):
    Params = DellaParams

    def __init__(self, params, n):
        super().__init__(params, n)
        self.draws = MaskStream(params.seed, 0.0)

    def sparsify(self, tau, name, model):
        probabilities = rank_probabilities(tau, self.p.density, self.p.epsilon)
        uniform = self.draws.uniform(name, model, 0, tau.numel()).to(tau.device).view_as(tau)
        mask = (uniform < probabilities).to(tau.dtype)
        return l1_rescaled(tau, mask) if self.p.rescale else tau * mask


@register
class Breadcrumbs(BreadcrumbsFamily):
    name = "breadcrumbs"
    description = "Model Breadcrumbs: drop the largest and the smallest entries, sum (mergekit)"


@register
class BreadcrumbsTies(BreadcrumbsFamily):
    name = "breadcrumbs_ties"
    consensus = True
    description = "Model Breadcrumbs with mergekit's sign consensus"


@register
class Della(DellaFamily):
    name = "della"
    Params = DellaTiesParams
    consensus = True
    description = "DELLA: magnitude-ranked drop probabilities, sign consensus, normalised (mergekit)"


@register
class DellaLinear(DellaFamily):
    name = "della_linear"
    description = "DELLA's magnitude-ranked drop, then a weighted sum (mergekit)"
