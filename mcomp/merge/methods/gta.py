"""Model Breadcrumbs and DELLA with mergekit's semantics and parameter names (mergekit's generalized task
arithmetic, `sparsify.py`): per tensor, each task vector is sparsified, multiplied by its weight, then
either summed or passed through mergekit's sign consensus, optionally normalised, scaled by λ.

    breadcrumbs       magnitude_outliers, no consensus, normalize false
    breadcrumbs_ties  magnitude_outliers, sign consensus, normalize false
    della             della_magprune,     sign consensus, normalize true,  rescale true
    della_linear      della_magprune,     no consensus,   normalize false, rescale true

Sparsifiers (per model, over the whole tensor, streamed in chunks: the order statistics and L1 norms
they need come from passes over the tensor; `density >= 1` leaves it unchanged):
* magnitude_outliers (Breadcrumbs): sort |τ| ascending; drop the int(gamma·N) largest (outliers) and the
  smallest, keeping int(density·N) entries (the outlier cut shrinks when both do not fit). Deviation, on
  purpose: mergekit keeps nothing when the outlier cut is 0 (an empty `[n_bot:-0]` slice: fewer than
  1/gamma elements, or gamma 0); here the cut is then simply empty and the kept entries are kept.
* della_magprune (DELLA): along dim 1 (a 1-D tensor is one row) entries are ranked by |τ| (1 = smallest),
  kept with probability density − ε + 2ε·(rank − 1)/(n − 1); a row of one entry keeps it with
  probability `density`, where mergekit divides 0 by 0. Draws: mcomp's reproducible per-(tensor, model)
  streams (`family.MaskStream`), where mergekit draws from torch's global generator.
* rescale: the kept entries are multiplied by ||τ||₁ / ||kept||₁ of the tensor (mergekit's l1 rescale,
  not the paper's 1/p), unless either norm is below 1e-7. The norms are summed in float64 chunk by chunk,
  where mergekit sums the whole tensor in float32: the factor can differ from its in the last bit.

Sign consensus (mergekit "sum"): the elected sign is + where Σ_i w_i τ_i ≥ 0, else −; an entry counts where
its weighted value has that sign (so pruned or zero-weight entries never count); `normalize` divides by
Σ_i w_i over the counted entries (1 where none), or without consensus by Σ_i w_i (1 where |Σ| < 1e-8).
`lambda` (mcomp's `scale`) multiplies the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mcomp.merge import native
from mcomp.merge.kernels import GrowableArray, count_below, count_equal, parallel_map
from mcomp.merge.methods.family import MaskStream
from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _count, _number, register
from mcomp.merge.selection import RowQuantiles, RowSum

RESCALE_EPS = 1e-7


def l1_rescaled(tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kept = tau * mask
    before, after = tau.abs().sum(), kept.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def rank_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities, linear in the rank of |τ| along dim 1 (a 1-D tensor is one row)."""
    t = tau.unsqueeze(0) if tau.dim() < 2 else tau
    length = t.shape[1]
    if native.available() and t.device.type == "cpu" and t.dtype == torch.float32:  # the argsort's ranks, faster
        ranks = native.abs_ranks(t.movedim(1, -1)).movedim(-1, 1).to(tau.dtype)
    else:
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
    """sparsify → weight → (sign consensus) → sum → (normalise) → λ, per tensor; streamed: the statistics a
    sparsifier needs of the whole tensor (order statistics, L1 norms) come from passes over its chunks."""

    consensus: ClassVar[bool] = False

    def sparsified(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        """The chunk's task vectors (n, C) after the sparsifier."""
        raise NotImplementedError

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        deltas = self.sparsified(tau, chunk, stats) if self.p.density < 1 else tau
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


def l1_factors(before: list[float], after: list[float]) -> list[float | None]:
    """Per model, mergekit's l1 rescale factor ||τ||₁ / ||kept||₁ (float32, as it divides), None where
    either norm is below RESCALE_EPS (the kept entries stay as they are)."""
    return [
        None if b < RESCALE_EPS or a < RESCALE_EPS else float(torch.tensor(b) / torch.tensor(a))
        for b, a in zip(before, after)
    ]


def rescaled(kept: torch.Tensor, factors: list[float | None] | None) -> torch.Tensor:
    """`kept` (n, C) with row i multiplied by factors[i] (left as it is where that is None)."""
    for i, f in enumerate(factors or ()):
        if f is not None:
            kept[i] *= f
    return kept


class BandCounts:
    """Breadcrumbs' second pass: per model, against its band's bounds (lo, hi) of |τ|, the entries below
    and equal to each bound, equal ones per chunk (to rank them by position in the merge pass), and, for
    the l1 rescale (`norms`), the L1 norms of the whole tensor and of the entries strictly inside the
    band (float64). Counts are Python ints: a small tensor kept per chunk among the chunk's large
    temporaries would keep the C heap from reusing their space."""

    def __init__(self, n: int, norms: bool):
        self.norms = norms
        self.below = [[0, 0] for _ in range(n)]
        self.equal: dict[int, list[list[int]]] = {}  # chunk index -> per model, the entries equal to lo, hi
        self.total, self.inside = [0.0] * n, [0.0] * n

    def update(self, index: int, a: torch.Tensor, bounds: list[list[float]]) -> None:
        """`a`: |τ| of chunk `index` (n, C); `bounds`: per model [lo, hi]."""

        def row(i: int) -> tuple[list[int], list[int], float, float]:
            x, (lo, hi) = a[i], bounds[i]
            below, equal = [count_below(x, lo), count_below(x, hi)], [count_equal(x, lo), count_equal(x, hi)]
            if not self.norms:
                return below, equal, 0.0, 0.0
            inside = x[(x > lo) & (x < hi)].sum(dtype=torch.float64)
            return below, equal, float(x.sum(dtype=torch.float64)), float(inside)

        rows = parallel_map(row, list(range(a.shape[0])))  # NumPy's counts release the GIL
        self.equal[index] = [equal for _, equal, _, _ in rows]
        for i, (below, _, total, inside) in enumerate(rows):
            self.below[i] = [b + c for b, c in zip(self.below[i], below)]
            self.total[i] += total
            self.inside[i] += inside


def band_ranks(d: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' kept band [start, stop) of ranks in ascending |τ| for d entries."""
    keep, top = int(density * d), int(gamma * d)
    bottom = d - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    return bottom, d - top


class BreadcrumbsFamily(GeneralizedTaskArithmetic):
    """Stage 0: the band's bounds per model, exact order statistics of |τ| over the tensor (the rank-start
    and rank-(stop − 1) values); stage 1: `BandCounts`. The merge pass keeps the entries strictly between
    the bounds and, of those equal to a bound, the ones whose rank (equal values ranked by position, as a
    stable sort ranks them) falls in the band."""

    Params = BreadcrumbsParams

    def num_stages(self) -> int:
        return 2 if self.p.density < 1 else 0

    def reducers(self, stage: int, d: int) -> dict:
        self._band = band_ranks(d, self.p.density, self.p.gamma)
        start, stop = self._band
        if stop <= start:
            return {}  # nothing kept
        if stage == 0:
            return {"bounds": RowQuantiles([[start, stop - 1]] * self.n, d)}
        return {"counts": BandCounts(self.n, self.p.rescale)}

    def observe(self, stage, tau, chunk, stats, reducers):
        if stage == 0:
            reducers["bounds"].update(tau.abs())
        else:
            reducers["counts"].update(chunk.index, tau.abs(), stats["bounds"])

    def finish(self, stage, reducers, stats):
        if not reducers:
            stats["bounds"] = None
            return
        if stage == 0:
            q = reducers["bounds"]
            start, stop = (t.rank for t in q.targets[:2])
            stats["bounds"] = [[q.value(i, start), q.value(i, stop)] for i in range(self.n)]
            return
        counts: BandCounts = reducers["counts"]
        if sorted(counts.equal) != list(range(len(counts.equal))):
            raise RuntimeError(f"breadcrumbs: the count pass saw chunks {sorted(counts.equal)} of the tensor")
        # per chunk k, per model: the entries equal to lo, to hi in the chunks before k (k = the chunk
        # count: the tensor's); ints, as the engine's report keeps every group's statistics
        upto = [[[0, 0] for _ in range(self.n)]]
        for k in range(len(counts.equal)):
            upto.append([[u + e for u, e in zip(ru, re)] for ru, re in zip(upto[-1], counts.equal[k])])
        stats["equal_upto"], stats["below"] = upto, counts.below
        if self.p.rescale:
            start, stop = self._band
            after = []
            for i, (lo, hi) in enumerate(stats["bounds"]):
                kept = counts.inside[i]
                for k, bound in enumerate((lo, hi) if lo != hi else (lo,)):
                    first = stats["below"][i][k]  # ranks of the equal entries: first, first + 1, ...
                    last = first + upto[-1][i][k]
                    kept += max(0, min(last, stop) - max(first, start)) * bound
                after.append(kept)
            stats["l1"] = l1_factors(counts.total, after)

    def sparsified(self, tau, chunk, stats):
        if stats.get("bounds") is None:
            return torch.zeros_like(tau)
        start, stop = self._band
        a = tau.abs()
        low, high, partial = [], [], []  # per model: keep low <= |τ| <= high; equal entries ranked one by one
        for i, (lo, hi) in enumerate(stats["bounds"]):
            keeps = []  # per bound: whether this chunk keeps all, none or some of the entries equal to it
            for k, bound in enumerate((lo, hi) if lo != hi else (lo,)):
                # the ranks of this chunk's entries equal to the bound: first, first + 1, ..., last - 1
                first = stats["below"][i][k] + stats["equal_upto"][chunk.index][i][k]
                last = stats["below"][i][k] + stats["equal_upto"][chunk.index + 1][i][k]
                keeps.append(
                    "all" if start <= first and last <= stop else "none" if last <= start or first >= stop else "some"
                )
                if keeps[-1] == "some":
                    partial.append((i, bound, first))
            # the next float32 past a bound leaves its equal entries out
            low.append(lo if keeps[0] == "all" else float(np.nextafter(np.float32(lo), np.float32(np.inf))))
            high.append(hi if keeps[-1] == "all" else float(np.nextafter(np.float32(hi), np.float32(-np.inf))))
        column = {"dtype": tau.dtype, "device": tau.device}
        keep = (a >= torch.tensor(low, **column).unsqueeze(1)) & (a <= torch.tensor(high, **column).unsqueeze(1))
        for i, bound, first in partial:  # at most one chunk a bound
            positions = torch.nonzero(a[i] == bound).flatten()  # in position order
            rank = first + torch.arange(positions.numel(), device=tau.device)
            keep[i, positions[(rank >= start) & (rank < stop)]] = True
        return rescaled(tau * keep, stats.get("l1"))


class KeptMasks:
    """A group's keep masks, chunk by chunk, as bits (np.packbits of each model's row): what stage 0
    drew, for the merge pass. One growing buffer per model rather than arrays kept per chunk, which
    would sit among the chunks' temporaries and keep the C heap from reusing their space."""

    def __init__(self, n: int, d: int):
        self.rows = [GrowableArray(np.uint8, capacity=d // 8 + 1024) for _ in range(n)]
        self.spans: dict[int, tuple[int, int, int]] = {}  # chunk index -> (first byte, last byte, columns)

    def put(self, index: int, keep: torch.Tensor) -> None:
        packed = np.packbits(keep.cpu().numpy(), axis=1)
        for row, bits in zip(self.rows, packed):
            first, last = row.append(bits)
        self.spans[index] = (first, last, keep.shape[1])

    def get(self, index: int, columns: int) -> torch.Tensor | None:
        """The mask (n, columns; bool) of chunk `index`, None where it was not kept."""
        if index not in self.spans:
            return None
        first, last, kept = self.spans[index]
        if kept != columns:
            raise RuntimeError(f"DELLA: chunk {index} has {columns} columns, its kept mask {kept}")
        bits = np.stack([np.unpackbits(row.view(first, last), count=columns) for row in self.rows])
        return torch.from_numpy(bits.view(np.bool_))


class DellaFamily(GeneralizedTaskArithmetic):
    """Each chunk holds whole slices along dim 0 (`whole_slices`), so the ranks along dim 1 are the
    tensor's; with rescale, stage 0 takes the L1 norms of τ and of the kept entries, and keeps its masks
    (`KeptMasks`) for the merge pass, which otherwise draws them itself."""

    Params = DellaParams
    whole_slices = True

    def __init__(self, params, n):
        super().__init__(params, n)
        self.draws = MaskStream(params.seed, 0.0)
        self._masks: KeptMasks | None = None

    def num_stages(self) -> int:
        return 1 if self.p.density < 1 and self.p.rescale else 0

    def reducers(self, stage: int, d: int) -> dict:
        self._masks = KeptMasks(self.n, d)
        return {"before": RowSum(self.n), "after": RowSum(self.n)}

    def observe(self, stage, tau, chunk, stats, reducers):
        keep = self._keep(tau, chunk)
        self._masks.put(chunk.index, keep)
        a = tau.abs()
        reducers["before"].update(a)
        reducers["after"].update(a * keep)

    def finish(self, stage, reducers, stats):
        stats["l1"] = l1_factors(reducers["before"].result(), reducers["after"].result())

    def _keep(self, tau: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        """DELLA's keep mask (n, C; bool) of the chunk's entries."""
        (seg,) = chunk.segments
        shape = seg.shape or (seg.size,)

        def row(i: int) -> torch.Tensor:
            probabilities = rank_probabilities(tau[i].view(shape), self.p.density, self.p.epsilon).reshape(-1)
            return self.draws.uniform(seg.name, i, seg.start, seg.stop).to(tau.device) < probabilities

        # the models on the pool: the ranks and the draws release the GIL, each model's stream its own
        return torch.stack(parallel_map(row, list(range(self.n))))

    def sparsified(self, tau, chunk, stats):
        keep = self._masks.get(chunk.index, tau.shape[1]) if self._masks is not None and "l1" in stats else None
        keep = self._keep(tau, chunk) if keep is None else keep.to(tau.device)
        return rescaled(tau * keep, stats.get("l1"))


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
