"""PCB-Merging's acceleration: the rule of `mcomp.merge.methods.pcb`, computed faster.

Each chunk is split into column blocks on a thread pool, with reusable scratch buffers; where the
native kernels are built (`mcomp.merge.native`) β is computed by fused kernels that reduce the
statistics while the block is in cache, and the chunks are read in their stored dtype.

Only coordinates where some task has β_i > t_i get a non-zero merge, so stage 1 also records, one
bit per coordinate, where some β_i exceeds the lower end of t_i's sample bracket (a bound below
the exact t_i); the merge pass then computes β on those columns only (about a quarter of them at
ratio 0.1) and writes exact zeros elsewhere, as the full computation would.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from mcomp.merge import native
from mcomp.merge.acceleration import Acceleration, NonFiniteInput
from mcomp.merge.kernels import GrowableArray, Workspace, column_blocks, parallel_map, queue_blocks, scratch
from mcomp.merge.methods.pcb import Pcb, balance, clip, clip_and_normalise, combine, scores_from_beta
from mcomp.merge.registry import Chunk
from mcomp.merge.selection import RowQuantiles

_FLOAT32 = torch.empty(0)  # the dtype/device model for scratch buffers of float32 results


class CandidateColumns:
    """Stage 1's record, one bit per coordinate, of where some β_i exceeds `floors[i]` (the low
    end of t_i's sample bracket). Valid for the merge pass only if every exact t_i >= floors[i].
    Blocks of a chunk may be recorded from several threads, in any order."""

    def __init__(self, floors: list[float], total: int, max_bytes: int):
        self.floors = floors
        self.bits = GrowableArray(np.uint8, capacity=min(total // 8 + 1024, max_bytes))
        self.spans: dict[int, list[tuple[int, int, int, int]]] = {}  # chunk -> (first column, columns, bytes)
        self.count = 0  # coordinates marked
        self._lock = threading.Lock()

    def record(self, index: int, beta: torch.Tensor, start: int = 0) -> None:
        """Mark the columns [start, start + width) of chunk `index`, whose β is `beta` (n, width)."""
        if native.usable(beta):
            packed, marked = native.mark_above(beta, self.floors)
        else:
            rows = beta.cpu().numpy() if beta.device.type != "cpu" else beta.numpy()
            keep = rows[0] > self.floors[0]
            for i in range(1, len(self.floors)):
                keep |= rows[i] > self.floors[i]
            packed, marked = np.packbits(keep), int(np.count_nonzero(keep))
        self.record_bits(index, start, beta.shape[1], packed, marked)

    def record_bits(self, index: int, start: int, width: int, packed: np.ndarray, marked: int) -> None:
        """Store the packed bits of columns [start, start + width) of chunk `index`."""
        with self._lock:
            span = self.bits.append(packed)
            self.spans.setdefault(index, []).append((start, width, *span))
            self.count += marked

    def covers(self, thresholds: list[float]) -> bool:
        return all(t >= f for t, f in zip(thresholds, self.floors))

    def blocks(self, index: int, size: int) -> list[tuple[int, int, np.ndarray]] | None:
        """(first column, columns, packed bits) of each block recorded for chunk `index`, in
        column order (None unless all `size` columns were recorded)."""
        spans = sorted(self.spans.get(index, ()))
        if sum(width for _, width, _, _ in spans) != size:
            return None
        return [(start, width, self.bits.view(b0, b1)) for start, width, b0, b1 in spans]

    def columns(self, index: int, size: int) -> torch.Tensor | None:
        """Indices of the marked coordinates of chunk `index` (None unless all `size` were recorded),
        for the NumPy merge path (the native one takes the bits of `blocks` directly)."""
        blocks = self.blocks(index, size)
        if blocks is None:
            return None
        parts = []
        for start, width, packed in blocks:
            bits = np.unpackbits(packed, count=width).view(np.bool_)  # bool: nonzero 7x faster
            parts.append(np.flatnonzero(bits) + start)
        return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])


class AcceleratedPcb(Acceleration, Pcb):
    accelerates = "pcb"

    # the candidate bit mask costs d/8 bytes per group; past this, merge without it
    CANDIDATE_MASK_BYTES = 1 << 30
    # values per (n, block) buffer of the per-chunk maths (1.5 MB: a few such buffers per worker fit in cache)
    BLOCK_VALUES = 3 << 17
    NATIVE_BLOCK_VALUES = 3 << 19
    _candidates: CandidateColumns | None = None  # this group's, once stage 1 recorded them
    _candidates_possible = False  # may stage 1 (still) record them for this group
    _max = None  # stage 1's RowMax
    _max_floors: list[float] | None = None  # per row, below what the fused pass's maximum is not exact
    _max_rebuild_pass = 0  # the fallback pass that recomputes the maximum (-1: checked exact; 0: not yet)

    def reducers(self, stage: int, d: int) -> dict:
        self._candidates = None
        self._candidates_possible = stage == 1 and self.workspace is not None and d / 8 <= self.CANDIDATE_MASK_BYTES
        reducers = super().reducers(stage, d)
        self._max, self._max_floors, self._max_rebuild_pass = reducers.get("max"), None, 0
        return reducers

    def beta(self, tau: torch.Tensor, stats: dict, workspace: Workspace | None = None) -> torch.Tensor:
        """β for this chunk (fused native kernel when available, else the NumPy/torch chain)."""
        ws = workspace if workspace is not None else self.workspace
        if native.usable(tau):
            return native.pcb_beta(
                tau, stats["lo"], stats["hi"], self.p.inter, scratch(ws, "pcb.beta", tau.shape, _FLOAT32)
            )
        _, norm = clip_and_normalise(tau, stats["lo"], stats["hi"], ws)
        return balance(tau, norm, self.p.inter, ws)

    def _block_columns(self) -> int:
        """Columns per block of the per-chunk maths. The native kernels tile internally, so for
        them a block only has to share the chunk between the workers (fewer calls, less Python)."""
        if native.available():
            return max(1, self.NATIVE_BLOCK_VALUES // self.n)
        return max(1, self.BLOCK_VALUES // self.n)

    def _blocked(self, tau: torch.Tensor) -> bool:
        return self.workspace is not None and tau.device.type == "cpu"

    def accepts_stored(self, stage: int | None) -> bool:
        # every pass reads each chunk straight from its stored dtype (the kernels decode as they load)
        return self.workspace is not None and native.available()

    def checks_finite(self, stage: int | None) -> bool:
        # stage 0 loads every τ_i anyway: the check rides along
        return stage == 0 and self.accepts_stored(stage)

    def observe(self, stage, tau, chunk, stats, reducers):
        quantiles = reducers["clip" if stage == 0 else "threshold"]
        # the common streaming case: every statistic reduces block by block, on the pool, while
        # each block's values are still in cache; otherwise (the sample, fallback passes, other
        # devices, in memory) the whole chunk is one block
        blockwise = (
            self._blocked(tau) and bool(chunk.segments) and isinstance(quantiles, RowQuantiles) and quantiles.blockwise
        )
        update = quantiles.update_block if blockwise else quantiles.update
        candidates = self._candidate_record(stage, quantiles) if chunk.segments else None
        # the brackets the fused kernels scan against (None: scan through the reducer)
        brackets = quantiles.row_brackets() if blockwise and native.usable(tau) else None
        if stage == 1 and brackets is not None:
            brackets = [row[0] for row in brackets]  # one target per row
            # the fused kernel computes β only where it may reach the bracket (or the candidate floor):
            # a row's maximum is exact where it reaches that
            floors = candidates.floors if candidates is not None else [b[0] for b in brackets]
            self._max_floors = [min(b[0], f) for b, f in zip(brackets, floors)]
        rebuild_max = stage == 1 and self._max_rebuild(quantiles)

        verify = stage == 0 and isinstance(tau, native.StoredColumns)

        def block(start: int, stop: int, ws: Workspace | None = None) -> None:
            part = native.columns(tau, start, stop)
            if stage == 0:
                if brackets is not None:  # fused: |τ| never stored
                    got = native.abs_brackets(part, brackets)
                    quantiles.add_scanned(part.shape[1], got.below, got.inside)
                    finite = got.finite
                else:
                    part = native.materialise(part)
                    a = torch.abs(part, out=scratch(ws, "pcb.a", part.shape, part))
                    finite = not verify or bool(torch.isfinite(a).all())
                    update(a)
                if not finite:
                    raise NonFiniteInput(chunk)
                return
            if brackets is not None:  # fused: β never leaves the cache
                got = native.pcb_stage1(
                    part,
                    stats["lo"],
                    stats["hi"],
                    self.p.inter,
                    brackets,
                    candidates.floors if candidates is not None else None,
                    reducers["max"].values,  # a row's running maximum decides the columns above it
                )
                quantiles.add_scanned(part.shape[1], got.below, got.inside)
                reducers["max"].update_max(got.maxima)
                if candidates is not None:
                    candidates.record_bits(chunk.index, start, part.shape[1], got.bits, got.marked)
                return
            beta = self.beta(part, stats, ws)
            if candidates is not None:
                candidates.record(chunk.index, beta, start)
            update(beta)
            (self._max if rebuild_max else reducers["max"]).update(beta)

        if blockwise and brackets is not None and native.lasting(tau):
            # the fused kernels on views of the sources: the blocks run on while the next chunks are read
            self.defer(queue_blocks(block, tau.shape[1], self._block_columns()))
        elif blockwise:
            column_blocks(block, tau.shape[1], self._block_columns(), self.workspace)
        else:
            block(0, tau.shape[1], self.workspace)

    def _max_rebuild(self, quantiles) -> bool:
        """Whether this (fallback) pass recomputes stage 1's maximum: the first one after a fused pass
        whose maximum of some row stayed below that row's floor (then so did its k-th value, and the
        bracket missed), when the fused kernel had left that row's maximum inexact."""
        if self._max_floors is None or not isinstance(quantiles, RowQuantiles) or quantiles.passes < 2:
            return False
        if self._max_rebuild_pass == 0:
            exact = all(m >= f for m, f in zip(self._max.result(), self._max_floors))
            if not exact:
                self._max.values = None
            self._max_rebuild_pass = -1 if exact else quantiles.passes
        return self._max_rebuild_pass == quantiles.passes

    def _candidate_record(self, stage: int, threshold) -> CandidateColumns | None:
        """Where stage 1's candidate bits go for this pass (None: not recorded)."""
        if stage != 1 or not self._candidates_possible:
            return None
        if not isinstance(threshold, RowQuantiles) or threshold.passes > 1:
            self._candidates, self._candidates_possible = None, False  # a fallback pass: untrustworthy
            return None
        if self._candidates is None:
            floors = threshold.bracket_floors()
            if floors is None:
                self._candidates_possible = False
                return None
            self._candidates = CandidateColumns(floors, threshold.total, self.CANDIDATE_MASK_BYTES)
        return self._candidates

    def finish(self, stage, reducers, stats):
        super().finish(stage, reducers, stats)
        if stage == 1 and self._candidates is not None:
            if not self._candidates.covers(stats["t"]):
                self._candidates = None  # a bracket missed: the mask may drop kept coordinates
            else:  # share of coordinates the merge pass computes β on
                stats["candidates"] = self._candidates.count / reducers["threshold"].total

    def scores(
        self, tau: torch.Tensor, stats: dict, workspace: Workspace | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, τ̃): the λ-independent part of the merge (reused across coefficient search)."""
        ws = workspace if workspace is not None else self.workspace
        if native.usable(tau):
            beta, a = self.beta(tau, stats, ws), clip(tau, stats["lo"], stats["hi"], ws)
        else:  # the chain's clipped magnitudes serve both β and τ̃
            a, norm = clip_and_normalise(tau, stats["lo"], stats["hi"], ws)
            beta = balance(tau, norm, self.p.inter, ws)
        s = scores_from_beta(beta, stats["t"], stats["m"])
        return s, torch.sign(tau, out=scratch(ws, "pcb.clipped", tau.shape, tau)).mul_(a)

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        weights = list(self.p.weights) if self.p.weights is not None else None
        if not self._blocked(tau):
            s, clipped = self.scores(tau, stats)
            return combine(clipped, s, weights, self.p.scale)
        if native.usable(tau):  # fused: each merged value written in place
            delta = scratch(self.workspace, "pcb.delta", (tau.shape[1],), _FLOAT32)
            blocks = self._candidates.blocks(chunk.index, tau.shape[1]) if self._candidates is not None else None
            if blocks is not None:  # stage 1's blocks (equal shares) with their bits: β on the marked columns only
                parallel_map(
                    lambda b: native.pcb_merge(
                        native.columns(tau, b[0], b[0] + b[1]),
                        stats,
                        self.p.inter,
                        weights,
                        self.p.scale,
                        delta[b[0] : b[0] + b[1]],
                        bits=b[2],
                    ),
                    blocks,
                )
                return delta

            def dense(start: int, stop: int, ws: Workspace) -> None:
                native.pcb_merge(
                    native.columns(tau, start, stop), stats, self.p.inter, weights, self.p.scale, delta[start:stop]
                )

            column_blocks(dense, tau.shape[1], self._block_columns(), self.workspace)
            return delta
        cols = self._candidates.columns(chunk.index, tau.shape[1]) if self._candidates is not None else None
        if cols is not None:  # β only where some task can pass its threshold; exact zeros elsewhere
            tau = torch.index_select(tau, 1, cols, out=scratch(self.workspace, "pcb.sub", (self.n, cols.numel()), tau))
        merged = scratch(self.workspace, "pcb.merged", (tau.shape[1],), tau)

        def block(start: int, stop: int, ws: Workspace) -> None:
            s, clipped = self.scores(tau[:, start:stop], stats, ws)
            merged[start:stop] = combine(clipped, s, weights, self.p.scale, inplace=True)

        column_blocks(block, tau.shape[1], self._block_columns(), self.workspace)
        if cols is None:
            return merged
        delta = torch.zeros(chunk.size, dtype=tau.dtype, device=tau.device)
        return delta.index_copy_(0, cols, merged)
