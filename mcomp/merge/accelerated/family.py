"""The task-arithmetic family's acceleration (task arithmetic, linear, TIES, DARE): the rule of
`mcomp.merge.methods.family`, on the fused native kernels.

Each pass reads the chunk in its stored dtype (the kernels decode θ_i − θ0 as they load a tile) and
runs on column blocks on the thread pool. TIES's trim thresholds are order statistics of |τ_i| scanned
against their sample brackets as PCB's clip statistics are (and the NaN/Inf check rides along); the
majority sign is an exact count; DARE's masks come from the method's own mask stream (a byte per
value, compared as drawn), the models' rows at once, so the same seed gives the same bytes on both
paths. Where the kernels are not built, or the maths runs on another device, the method's torch path
runs instead.
"""

from __future__ import annotations

import numpy as np
import torch

from mcomp.merge import native
from mcomp.merge.acceleration import Acceleration, NonFiniteInput
from mcomp.merge.kernels import Workspace, column_blocks, parallel_map, queue_blocks, scratch
from mcomp.merge.methods.family import DareLinear, DareTies, Linear, TaskArithmetic, Ties
from mcomp.merge.registry import Chunk
from mcomp.merge.selection import RowQuantiles

_FLOAT32 = torch.empty(0)
_UINT8 = torch.empty(0, dtype=torch.uint8)


class AcceleratedFamily(Acceleration):
    """Mixed into each member: `class AcceleratedTies(AcceleratedFamily, Ties)`."""

    # columns per block: the kernels tile internally, so a block only shares the chunk between workers
    BLOCK_VALUES = 3 << 19

    def _block_columns(self) -> int:
        return max(1, self.BLOCK_VALUES // self.n)

    def accepts_stored(self, stage: int | None) -> bool:
        return self.workspace is not None and native.available()

    def checks_finite(self, stage: int | None) -> bool:
        # every pass loads each τ_i anyway: the check rides along the first (the merge pass where
        # there are no statistics)
        return self.accepts_stored(stage) and (stage is not None or not self.stages)

    def _native(self, tau) -> bool:
        return self.workspace is not None and native.usable(tau)

    def _drop_mask(self, chunk: Chunk) -> torch.Tensor | None:
        """DARE's mask for the chunk (n, C; uint8), from the method's mask stream; None without a drop."""
        if self.sparsify != "random" or self.p.density >= 1:
            return None
        out = scratch(self.workspace, "family.keep", (self.n, chunk.size), _UINT8)

        def row(model: int) -> None:  # the models' streams at once (the draws release the GIL)
            pos = 0
            for s in chunk.segments:
                self.masks.keep(s.name, model, s.start, s.stop, out=out[model, pos : pos + s.size])
                pos += s.size

        parallel_map(row, list(range(self.n)))
        return out

    def _args(self, stats: dict, keep: torch.Tensor | None) -> native.FamilyArgs:
        if self.sparsify == "none" and self.consensus == "none":
            w = self.p.weight_list(self.n)
            return native.family_args(
                weights=[x / sum(w) for x in w] if self.normalise else w, plain=True, scale=self.p.scale
            )
        rescale = stats.get("l1_factor") if self.sparsify == "random" and self.p.rescale == "l1" else None
        return native.family_args(
            thresholds=stats.get("threshold_values") if self.sparsify == "magnitude" else None,
            keep=keep,
            density=self.p.density if keep is not None else 1.0,
            rescale=rescale if keep is not None else None,
            weights=list(self.p.weights) if self.p.weights is not None else None,
            sign=self.p.sign if self.consensus == "sign" else None,
            majority=stats.get("majority", 0.0),
            scale=self.p.scale,
        )

    def observe(self, stage, tau, chunk, stats, reducers):
        if not self._native(tau) or not chunk.segments:
            return super().observe(stage, self._materialise(tau, chunk), chunk, stats, reducers)
        kind = self.stages[stage]
        if kind == "trim":
            return self._observe_trim(tau, chunk, reducers)
        size, parts = tau.shape[1], []
        if kind == "l1":
            keep = self._drop_mask(chunk)

            def block(start: int, stop: int, ws: Workspace | None) -> None:
                parts.append(native.family_l1(native.columns(tau, start, stop), keep, start))

            column_blocks(block, size, self._block_columns(), self.workspace)
            self._raise_nonfinite(all(f for _, _, f in parts), chunk)
            reducers["before"].values += torch.from_numpy(np.sum([b for b, _, _ in parts], axis=0))
            reducers["after"].values += torch.from_numpy(np.sum([a for _, a, _ in parts], axis=0))
            return
        args = self._args(stats, self._drop_mask(chunk))

        def signs(start: int, stop: int, ws: Workspace | None) -> None:
            parts.append(native.family_signs(native.columns(tau, start, stop), args, start))

        column_blocks(signs, size, self._block_columns(), self.workspace)
        self._raise_nonfinite(all(f for _, f in parts), chunk)
        reducers["signs"].values[0] += float(sum(b for b, _ in parts))

    def _materialise(self, tau, chunk: Chunk) -> torch.Tensor:
        """The float32 task vectors for the torch path; stored values the kernels cannot take are
        checked here, as `checks_finite` promised the engine."""
        if not isinstance(tau, native.StoredColumns):
            return tau
        tau = native.materialise(tau)
        self._raise_nonfinite(bool(torch.isfinite(tau).all()), chunk)
        return tau

    @staticmethod
    def _raise_nonfinite(finite: bool, chunk: Chunk) -> None:
        if not finite:  # the engine reads the chunk again to name the tensor and model(s) at fault
            raise NonFiniteInput(chunk)

    def _observe_trim(self, tau, chunk: Chunk, reducers) -> None:
        if "trim" not in reducers:  # density 1: nothing is trimmed
            return
        quantiles = reducers["trim"]
        brackets = quantiles.row_brackets() if isinstance(quantiles, RowQuantiles) else None

        def block(start: int, stop: int, ws: Workspace | None = None) -> None:
            part = native.columns(tau, start, stop)
            if brackets is not None:
                got = native.abs_brackets(part, brackets)
                quantiles.add_scanned(part.shape[1], got.below, got.inside)
                self._raise_nonfinite(got.finite, chunk)
                return
            a = native.materialise(part).abs()
            self._raise_nonfinite(bool(torch.isfinite(a).all()), chunk)
            quantiles.update(a)  # the whole chunk is one block here

        if brackets is not None and quantiles.blockwise and native.lasting(tau):
            # views of the sources: the blocks run on while the next chunks are read
            self.defer(queue_blocks(block, tau.shape[1], self._block_columns()))
        elif brackets is not None and quantiles.blockwise:
            column_blocks(block, tau.shape[1], self._block_columns(), self.workspace)
        else:
            block(0, tau.shape[1], self.workspace)

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        if not self._native(tau) or not chunk.segments:
            return super().merge(self._materialise(tau, chunk), chunk, stats)
        args = self._args(stats, self._drop_mask(chunk))
        delta = scratch(self.workspace, "family.delta", (tau.shape[1],), _FLOAT32)
        finite = []

        def block(start: int, stop: int, ws: Workspace | None) -> None:
            finite.append(native.family_merge(native.columns(tau, start, stop), args, delta[start:stop], start))

        column_blocks(block, tau.shape[1], self._block_columns(), self.workspace)
        self._raise_nonfinite(all(finite), chunk)
        return delta


class AcceleratedTaskArithmetic(AcceleratedFamily, TaskArithmetic):
    accelerates = "task_arithmetic"


class AcceleratedLinear(AcceleratedFamily, Linear):
    accelerates = "linear"


class AcceleratedTies(AcceleratedFamily, Ties):
    accelerates = "ties"


class AcceleratedDareLinear(AcceleratedFamily, DareLinear):
    accelerates = "dare_linear"


class AcceleratedDareTies(AcceleratedFamily, DareTies):
    accelerates = "dare_ties"
