"""DARE (Yu et al. 2024): drop each task-vector entry with probability 1 − density, rescale.

`density` is the keep probability. `rescale: inverse` (the paper) divides kept entries by
density, so E[result] = τ; `rescale: l1` (mergekit) multiplies them by ||τ||_1 / ||kept||_1 of
the scope (0 when nothing is kept). Then `dare_linear` sums like task arithmetic and
`dare_ties` applies TIES steps 2–4 (sign election, disjoint mean).

Reproducibility: the mask of tensor `name` of model i comes from its own torch.Generator
seeded with sha256(seed, name, i), drawn in element order. Slicing a tensor into chunks does
not change the draws (the CPU generator is sequential), so the same seed gives the same
bytes in memory, streaming, with any chunk size, on any device (masks are drawn on the CPU).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from mcomp.merge.linear import weighted_sum
from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _choice, _number, register
from mcomp.merge.selection import RowSum
from mcomp.merge.ties import disjoint_mean, elect_signs


def mask_seed(seed: int, name: str, model: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{model}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class MaskStream:
    """Bernoulli(keep) masks per (tensor, model), reproducible and chunk-independent."""

    def __init__(self, seed: int, density: float):
        self.seed = seed
        self.density = density
        self._state: dict[tuple[str, int], tuple[torch.Generator, int]] = {}

    def mask(self, name: str, model: int, start: int, stop: int) -> torch.Tensor:
        key = (name, model)
        if start == 0:
            gen = torch.Generator().manual_seed(mask_seed(self.seed, name, model))
        else:
            gen, expected = self._state.get(key, (None, -1))
            if gen is None or expected != start:
                raise RuntimeError(
                    f"DARE masks must be drawn in order: {name!r} model {model} at {start}, expected {expected}"
                )
        out = torch.rand(stop - start, generator=gen) < self.density
        self._state[key] = (gen, stop)
        return out


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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"parameter 'seed' must be a non-negative integer, got {self.seed!r}")


@dataclass
class DareTiesParams(DareParams):
    sign: str = "mass"

    def validate(self, n: int) -> None:
        super().validate(n)
        _choice(self, "sign", ("mass", "frequency"))


class _Dare(MergeMethod):
    def __init__(self, params, n, workspace=None):
        super().__init__(params, n, workspace)
        self.masks = MaskStream(params.seed, params.density)

    def _keep(self, tau: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        rows = []
        for i in range(self.n):
            parts = [self.masks.mask(s.name, i, s.start, s.stop) for s in chunk.segments]
            rows.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        return torch.stack(rows).to(tau.device)

    def _l1_stage(self) -> bool:
        return self.p.rescale == "l1" and self.p.density < 1

    def dropped(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        """The dropped and rescaled task vectors (n, C), weights applied."""
        if self.p.density < 1:
            keep = self._keep(tau, chunk)
            kept = tau * keep
            if self.p.rescale == "inverse":
                out = kept.div_(self.p.density)
            else:
                out = kept.mul_(torch.tensor(stats["l1_factor"], dtype=tau.dtype, device=tau.device).unsqueeze(1))
        else:
            out = tau
        w = self.weights_column(tau)
        return out if w is None else out * w

    def observe_l1(self, tau, chunk, reducers):
        keep = self._keep(tau, chunk)
        a = tau.abs()
        reducers["before"].update(a)
        reducers["after"].update(a * keep)

    def finish_l1(self, reducers, stats):
        before, after = reducers["before"].result(), reducers["after"].result()
        stats["l1_factor"] = [b / a if a > 0 else 0.0 for b, a in zip(before, after)]


@register
class DareLinear(_Dare):
    name = "dare_linear"
    Params = DareParams
    description = "DARE drop-and-rescale, then task arithmetic"

    def num_stages(self) -> int:
        return 1 if self._l1_stage() else 0

    def reducers(self, stage, d):
        return {"before": RowSum(self.n), "after": RowSum(self.n)}

    def observe(self, stage, tau, chunk, stats, reducers):
        self.observe_l1(tau, chunk, reducers)

    def finish(self, stage, reducers, stats):
        self.finish_l1(reducers, stats)

    def merge(self, tau, chunk, stats):
        out = weighted_sum(self.dropped(tau, chunk, stats), [1.0] * self.n)
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out


@register
class DareTies(_Dare):
    name = "dare_ties"
    Params = DareTiesParams
    description = "DARE drop-and-rescale, then TIES sign election and disjoint mean"

    def num_stages(self) -> int:
        return 2 if self._l1_stage() else 1

    def reducers(self, stage, d):
        if stage == 0 and self._l1_stage():
            return {"before": RowSum(self.n), "after": RowSum(self.n)}
        return {"signs": RowSum(1)}

    def observe(self, stage, tau, chunk, stats, reducers):
        if "before" in reducers:
            self.observe_l1(tau, chunk, reducers)
        else:
            reducers["signs"].update(elect_signs(self.dropped(tau, chunk, stats), self.p.sign).unsqueeze(0))

    def finish(self, stage, reducers, stats):
        if "before" in reducers:
            self.finish_l1(reducers, stats)
        else:
            total = reducers["signs"].result()[0]
            stats["majority"] = float((total > 0) - (total < 0))

    def merge(self, tau, chunk, stats):
        t = self.dropped(tau, chunk, stats)
        out = disjoint_mean(t, elect_signs(t, self.p.sign), stats["majority"])
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out
