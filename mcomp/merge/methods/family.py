"""The task-arithmetic family (mergekit's generalized task arithmetic): one method class whose
members differ in three choices, each step exact to its paper's released code.

    sparsify   none | magnitude (TIES trim) | random (DARE drop and rescale)
    consensus  none (weighted sum) | sign (TIES election and disjoint mean)
    normalise  the weights to sum to 1 (the linear average) or not

Members: `task_arithmetic` (none, none), `linear` (none, none, normalised), `ties` (magnitude,
sign), `dare_linear` (random, none), `dare_ties` (random, sign).

TIES (Yadav et al. 2023), as released:
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

DARE (Yu et al. 2024): drop each task-vector entry with probability 1 − density, rescale.
`density` is the keep probability. `rescale: inverse` (the paper) divides kept entries by
density, so E[result] = τ; `rescale: l1` (mergekit) multiplies them by ||τ||_1 / ||kept||_1 of
the scope (0 when nothing is kept). Reproducibility: the mask of tensor `name` of model i comes
from its own torch.Generator seeded with sha256(seed, name, i), drawn in element order (torch.rand's
numbers, which the native copy of that generator draws where it is built). Slicing a
tensor into chunks does not change the draws (the CPU generator is sequential), so the same seed
gives the same bytes in memory, streaming, with any chunk size, on any device (masks are drawn on
the CPU).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from mcomp.merge import native
from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _choice, _count, _number, register
from mcomp.merge.selection import RowQuantiles, RowSum

# --- the steps --------------------------------------------------------------------------------


def weighted_sum(tau: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Σ_i w_i τ_i, accumulated in model order (float32)."""
    out = tau[0] * weights[0]
    for i in range(1, tau.shape[0]):
        out.add_(tau[i], alpha=weights[i])
    return out


def elect_signs(t: torch.Tensor, sign: str) -> torch.Tensor:
    """Per-coordinate elected sign (before the zero fix-up)."""
    if sign == "mass":
        return torch.sign(t.sum(0))
    return torch.sign(torch.sign(t).sum(0))


def agreeing(t: torch.Tensor, elected: torch.Tensor, majority: float) -> torch.Tensor:
    """The entries whose sign agrees with the elected sign (the majority where it is 0), others 0."""
    s = torch.where(elected == 0, torch.full_like(elected, majority), elected)
    return t * torch.where(s.unsqueeze(0) > 0, t > 0, t < 0)


def disjoint_mean(t: torch.Tensor, elected: torch.Tensor, majority: float) -> torch.Tensor:
    """Mean over tasks of the entries whose sign agrees with the elected sign."""
    selected = agreeing(t, elected, majority)
    counts = (selected != 0).sum(0).float()
    return selected.sum(0) / torch.clamp(counts, min=1)


def disjoint_sum(t: torch.Tensor, elected: torch.Tensor, majority: float) -> torch.Tensor:
    """Sum over tasks of the entries whose sign agrees with the elected sign (TIES "dis-sum")."""
    return agreeing(t, elected, majority).sum(0)


def trim_rank(d: int, density: float) -> int | None:
    """0-indexed rank of the trim threshold in ascending |τ|; None when everything is kept."""
    k = d - int(d * density)
    return None if k <= 0 else k - 1


def mask_seed(seed: int, name: str, model: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{model}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _TorchDraws:
    """torch's own generator, where the native copy is not built."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def draw(self, out: torch.Tensor) -> torch.Tensor:
        return torch.rand(out.numel(), generator=self.gen, out=out)

    def keep(self, out: torch.Tensor, density: float) -> torch.Tensor:
        return torch.lt(self.draw(torch.empty(out.numel())), density, out=out.view(torch.bool)).view(torch.uint8)


def _draws(seed: int):
    """A uniform stream with torch.rand's numbers for `seed`: the native copy of torch's mt19937 where
    it is built (the same bits, drawn faster and without the GIL), else torch's generator."""
    return native.TorchUniformStream(seed) if native.available() else _TorchDraws(seed)


class MaskStream:
    """Bernoulli(keep) masks per (tensor, model), reproducible and chunk-independent."""

    def __init__(self, seed: int, density: float):
        self.seed = seed
        self.density = density
        self._state: dict[tuple[str, int], tuple[object, int]] = {}

    def mask(self, name: str, model: int, start: int, stop: int) -> torch.Tensor:
        return self.uniform(name, model, start, stop) < self.density

    def uniform(self, name: str, model: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The stream's uniform draws for elements [start, stop) of (tensor, model), drawn in order
        (into `out`, contiguous float32, if given). Different (tensor, model) streams may be drawn
        from different threads."""
        stream = self._stream(name, model, start)
        out = stream.draw(torch.empty(stop - start) if out is None else out)
        self._state[(name, model)] = (stream, stop)
        return out

    def keep(self, name: str, model: int, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """`mask` into the contiguous uint8 `out` (0/1): the same draws, compared as they are made."""
        stream = self._stream(name, model, start)
        stream.keep(out, self.density)
        self._state[(name, model)] = (stream, stop)
        return out

    def _stream(self, name: str, model: int, start: int):
        """The (tensor, model) stream positioned at element `start` (a new one at 0)."""
        if start == 0:
            return _draws(mask_seed(self.seed, name, model))
        stream, expected = self._state.get((name, model), (None, -1))
        if stream is None or expected != start:
            raise RuntimeError(
                f"DARE masks must be drawn in order: {name!r} model {model} at {start}, expected {expected}"
            )
        return stream


# --- the parameters of each member ------------------------------------------------------------


@dataclass
class TaskArithmeticParams(MethodParams):
    """w_i default 1, λ default 1 (no normalisation: Σ of task vectors)."""


@dataclass
class LinearParams(MethodParams):
    """Weighted average: w_i are normalised to sum to 1 (mergekit `linear`); equal weights by default."""

    def validate(self, n: int) -> None:
        super().validate(n)
        if abs(sum(self.weight_list(n))) < 1e-12:
            raise ValueError("parameter 'weights' sums to 0: a weighted average needs a non-zero total")


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


@dataclass
class DareParams(MethodParams):
    density: float = 0.5
    rescale: str = "inverse"
    seed: int = 0
    scope: str = "tensor"

    def validate(self, n: int) -> None:
        super().validate(n)
        _number(self, "density", 0.0, 1.0, lo_open=True)
        _choice(self, "rescale", ("inverse", "l1"))
        _choice(self, "scope", ("global", "tensor"))
        _count(self, "seed")


@dataclass
class DareTiesParams(DareParams):
    sign: str = "mass"

    def validate(self, n: int) -> None:
        super().validate(n)
        _choice(self, "sign", ("mass", "frequency"))


# --- the family -------------------------------------------------------------------------------


class TaskArithmeticFamily(MergeMethod):
    """One member per (sparsify, consensus, normalise); the statistics passes it needs follow
    from those choices: the trim thresholds (magnitude), the L1 norms before and after the drop
    (random with l1 rescale), the majority sign of the scope (sign consensus)."""

    sparsify: ClassVar[str] = "none"  # "none" | "magnitude" | "random"
    consensus: ClassVar[str] = "none"  # "none" | "sign"
    normalise: ClassVar[bool] = False

    def __init__(self, params, n):
        super().__init__(params, n)
        self.masks = MaskStream(params.seed, params.density) if self.sparsify == "random" else None
        self.stages = [
            *(["trim"] if self.sparsify == "magnitude" else []),
            *(["l1"] if self.sparsify == "random" and params.rescale == "l1" and params.density < 1 else []),
            *(["signs"] if self.consensus == "sign" else []),
        ]

    def num_stages(self) -> int:
        return len(self.stages)

    def reducers(self, stage: int, d: int) -> dict:
        kind = self.stages[stage]
        if kind == "trim":
            r = trim_rank(d, self.p.density)
            return {} if r is None else {"trim": RowQuantiles([[r]] * self.n, d)}
        if kind == "l1":
            return {"before": RowSum(self.n), "after": RowSum(self.n)}
        return {"signs": RowSum(1)}

    def observe(self, stage, tau, chunk, stats, reducers):
        kind = self.stages[stage]
        if kind == "trim":
            if "trim" in reducers:
                reducers["trim"].update(tau.abs())
        elif kind == "l1":
            a = tau.abs()
            reducers["before"].update(a)
            reducers["after"].update(a * self._keep(tau, chunk))
        else:
            reducers["signs"].update(elect_signs(self.sparsified(tau, chunk, stats), self.p.sign).unsqueeze(0))

    def finish(self, stage, reducers, stats):
        kind = self.stages[stage]
        if kind == "trim":
            if "trim" in reducers:
                q = reducers["trim"]
                r = q.targets[0].rank
                stats["threshold_values"] = [q.value(i, r) for i in range(self.n)]
        elif kind == "l1":
            before, after = reducers["before"].result(), reducers["after"].result()
            stats["l1_factor"] = [b / a if a > 0 else 0.0 for b, a in zip(before, after)]
        else:
            total = reducers["signs"].result()[0]
            stats["majority"] = float((total > 0) - (total < 0))

    def _keep(self, tau: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        rows = []
        for i in range(self.n):
            parts = [self.masks.mask(s.name, i, s.start, s.stop) for s in chunk.segments]
            rows.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        return torch.stack(rows).to(tau.device)

    def sparsified(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        """The task vectors (n, C) after the sparsify step, per-model weights applied."""
        t = tau
        if self.sparsify == "magnitude" and stats.get("threshold_values") is not None:
            column = torch.tensor(stats["threshold_values"], dtype=tau.dtype, device=tau.device).unsqueeze(1)
            t = tau * (tau.abs() >= column)
        elif self.sparsify == "random" and self.p.density < 1:
            kept = tau * self._keep(tau, chunk)
            if self.p.rescale == "inverse":
                t = kept.div_(self.p.density)
            else:
                t = kept.mul_(torch.tensor(stats["l1_factor"], dtype=tau.dtype, device=tau.device).unsqueeze(1))
        w = self.weights_column(tau)
        return t if w is None else t * w

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        if self.consensus == "sign":
            t = self.sparsified(tau, chunk, stats)
            out = disjoint_mean(t, elect_signs(t, self.p.sign), stats["majority"])
        elif self.sparsify == "none":  # the weights enter the sum itself
            w = self.p.weight_list(self.n)
            out = weighted_sum(tau, [x / sum(w) for x in w] if self.normalise else w)
        else:
            out = weighted_sum(self.sparsified(tau, chunk, stats), [1.0] * self.n)
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out


@register
class TaskArithmetic(TaskArithmeticFamily):
    name = "task_arithmetic"
    Params = TaskArithmeticParams
    description = "θ0 + λ Σ w_i τ_i (Ilharco et al. 2023)"


@register
class Linear(TaskArithmeticFamily):
    name = "linear"
    Params = LinearParams
    normalise = True
    description = "weighted average θ0 + λ Σ (w_i/Σw) τ_i = Σ (w_i/Σw) θ_i for λ = 1"


@register
class Ties(TaskArithmeticFamily):
    name = "ties"
    Params = TiesParams
    sparsify, consensus = "magnitude", "sign"
    description = "TIES-Merging: trim, elect sign, disjoint mean"


@register
class DareLinear(TaskArithmeticFamily):
    name = "dare_linear"
    Params = DareParams
    sparsify = "random"
    description = "DARE drop-and-rescale, then task arithmetic"


@register
class DareTies(TaskArithmeticFamily):
    name = "dare_ties"
    Params = DareTiesParams
    sparsify, consensus = "random", "sign"
    description = "DARE drop-and-rescale, then TIES sign election and disjoint mean"
