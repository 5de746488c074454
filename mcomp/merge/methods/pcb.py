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
`mcomp.merge.selection`; everything else is per coordinate. Stage 0 finds lo/hi over |τ|,
stage 1 finds t/m over β, then the merge pass recomputes β chunk by chunk. Only coordinates
where some task has β_i > t_i get a non-zero merge, so stage 1 also records, one bit per
coordinate, where some β_i exceeds the lower end of t_i's sample bracket (a bound below the
exact t_i); the merge pass then computes β on those columns only (about a quarter of them at
ratio 0.1) and writes exact zeros elsewhere, as the full computation would.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from mcomp.merge import native
from mcomp.merge.kernels import GrowableArray, Workspace, column_blocks, exp_, parallel_map, scratch, tanh_
from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, NonFiniteInput, _choice, _number, register
from mcomp.merge.selection import RowMax, RowQuantiles

_FLOAT32 = torch.empty(0)  # the dtype/device model for scratch buffers of float32 results


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

    # the candidate bit mask costs d/8 bytes per group; past this, merge without it
    CANDIDATE_MASK_BYTES = 1 << 30
    # values per (n, block) buffer of the per-chunk maths (1.5 MB: a few such buffers per worker fit in cache)
    BLOCK_VALUES = 3 << 17
    NATIVE_BLOCK_VALUES = 3 << 19
    _candidates: CandidateColumns | None = None  # this group's, once stage 1 recorded them
    _candidates_possible = False  # may stage 1 (still) record them for this group

    def num_stages(self) -> int:
        return 2

    def reducers(self, stage: int, d: int) -> dict:
        self._candidates = None
        self._candidates_possible = stage == 1 and self.workspace is not None and d / 8 <= self.CANDIDATE_MASK_BYTES
        if stage == 0:
            lo, hi = clip_ranks(d, self.p.clip)
            return {"clip": RowQuantiles([[lo, hi]] * self.n, d)}
        return {"threshold": RowQuantiles([[threshold_rank(d, self.p.ratio)]] * self.n, d), "max": RowMax(self.n)}

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

    def checks_finite(self, stage: int) -> bool:
        # stage 0 loads every τ_i anyway: the check rides along (about 1 s less over 3 × 1B values)
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

        nonfinite = []  # stage 0 on stored values: the blocks that found NaN/Inf (see checks_finite)
        verify = stage == 0 and isinstance(tau, native.StoredColumns)

        def block(start: int, stop: int, ws: Workspace | None) -> None:
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
                    nonfinite.append(start)
                return
            if brackets is not None:  # fused: β never leaves the cache
                got = native.pcb_stage1(
                    part,
                    stats["lo"],
                    stats["hi"],
                    self.p.inter,
                    brackets,
                    candidates.floors if candidates is not None else None,
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
            reducers["max"].update(beta)

        if blockwise:
            column_blocks(block, tau.shape[1], self._block_columns(), self.workspace)
        else:
            block(0, tau.shape[1], self.workspace)
        if verify and nonfinite:
            raise NonFiniteInput(f"chunk {chunk.index} contains NaN or Inf")

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
            if self._candidates is not None and not self._candidates.covers(stats["t"]):
                self._candidates = None  # a bracket missed: the mask may drop kept coordinates
            if self._candidates is not None:  # share of coordinates the merge pass computes β on
                stats["candidates"] = self._candidates.count / q.total

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
