"""Exact order statistics of a stream of float32 rows, in bounded memory.

PCB and TIES need, per task, a few order statistics (k-th smallest values) over the whole
model (`global` scope). The released code sorts one n×d matrix; here the data arrives in
chunks and every statistic is found exactly, without ever holding a row:

* bracket (one pass): a small sample gives a value interval [L, U] that almost surely holds
  the k-th value; one pass counts the values below L, the values equal to L, and collects
  the few values in (L, U]; the k-th value is then selected among those. The counts verify
  the bracket, so a wrong guess costs a fallback, never a wrong answer.
* histogram (two passes, the fallback, and the method when there is no sample): float32
  values map to order-preserving int32 keys; pass one counts the top 16 key bits (65536
  bins), pass two counts the low 16 bits inside the one bin holding rank k. That pins the
  exact 32-bit pattern, i.e. the exact value.
* whole (no extra pass): when one chunk holds the whole row, torch.kthvalue directly.

Ranks are 0-indexed positions in the ascending order (the spec's "index floor(d*p)").
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass

import numpy as np
import torch

from mcomp.merge.kernels import GrowableArray, bracket_scan, count_below, count_equal, parallel_map

_BINS = 1 << 16


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys with the same order as the float32 values (-0.0 is folded onto +0.0)."""
    bits = (x.float() + 0.0).view(torch.int32)  # x + 0.0 turns -0.0 into +0.0
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def key_to_float(key: int) -> float:
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def kth_smallest(row: torch.Tensor, rank: int) -> float:
    """The value at 0-indexed position `rank` of the ascending sort of a 1-D tensor."""
    return float(torch.kthvalue(row.float().flatten().cpu(), rank + 1).values)


@dataclass
class _Target:
    row: int
    rank: int
    mode: str = "histogram"  # whole | bracket | histogram | fine | done
    value: float | None = None
    lo: float = -math.inf  # bracket
    hi: float = math.inf
    below: int = 0
    equal: int = 0
    found: int = 0
    pieces: GrowableArray | None = None  # the values collected inside the bracket
    overflow: bool = False
    coarse_bin: int = 0  # fine pass
    rank_in_bin: int = 0


class RowQuantiles:
    """Exact k-th values of each row of an (n, total) matrix seen as a stream of (n, C) chunks.

    `ranks[i]` lists the 0-indexed ranks wanted for row i. Drive it with `begin_pass`,
    `update(chunk)` for every chunk in the same order, `end_pass`, while `needs_pass`.
    `candidate_cap` bounds the values a bracket may collect (per target); beyond it the
    target falls back to the histogram method.
    """

    def __init__(self, ranks: list[list[int]], total: int, *, candidate_cap: int = 1 << 24, z: float = 8.0):
        self.total = int(total)
        self.cap = int(candidate_cap)
        self.z = float(z)
        self.targets: list[_Target] = []
        for row, rs in enumerate(ranks):
            for r in rs:
                if not 0 <= r < self.total:
                    raise ValueError(f"rank {r} out of range for a row of {self.total} values")
                self.targets.append(_Target(row=row, rank=int(r)))
        self.passes = 0
        self._hist: dict[int, torch.Tensor] = {}
        self._seen = 0
        self._lock = threading.Lock()  # `update_block` may run on several threads

    # -- set-up ---------------------------------------------------------------------------
    def use_sample(self, sample: torch.Tensor) -> None:
        """Set value brackets from a sample (n, m) of the rows (spread over positions)."""
        sample = sample.float().cpu()
        m = sample.shape[1]
        if m == 0:
            return
        ranks: list[tuple[_Target, int, int]] = []
        for t in self.targets:
            if t.mode != "histogram":
                continue
            p = (t.rank + 0.5) / self.total
            centre = p * m
            width = self.z * math.sqrt(m * p * (1 - p)) + 4
            ranks.append((t, math.floor(centre - width), math.ceil(centre + width)))
        for row in sorted({t.row for t, _, _ in ranks}):  # one partial sort per row for all its bracket ends
            kth = sorted({j for t, *js in ranks if t.row == row for j in js if 0 <= j < m})
            values = np.partition(sample[row].numpy(), kth) if kth else None
            for t, j_lo, j_hi in ranks:
                if t.row == row:
                    t.lo = float(values[j_lo]) if j_lo >= 0 else -math.inf
                    t.hi = float(values[j_hi]) if j_hi < m else math.inf
                    t.mode = "bracket"

    def bracket_floors(self) -> list[float] | None:
        """Per row, the lowest bracket bound of its targets, while every target is bracketed
        (so each value found later lies at or above it); None otherwise."""
        floors = [math.inf] * (max((t.row for t in self.targets), default=-1) + 1)
        for t in self.targets:
            if t.mode != "bracket" or t.lo == -math.inf:
                return None
            floors[t.row] = min(floors[t.row], t.lo)
        return floors

    @property
    def blockwise(self) -> bool:
        """True when every open target is bracketed: then `update_block` may be used."""
        return all(t.mode in ("bracket", "done") for t in self.targets) and self.needs_pass

    @property
    def needs_pass(self) -> bool:
        return any(t.mode != "done" for t in self.targets)

    def value(self, row: int, rank: int) -> float:
        for t in self.targets:
            if t.row == row and t.rank == rank:
                if t.value is None:
                    raise RuntimeError("order statistic not resolved yet")
                return t.value
        raise KeyError((row, rank))

    # -- passes ---------------------------------------------------------------------------
    def begin_pass(self) -> None:
        self.passes += 1
        self._seen = 0
        self._hist = {}
        for t in self.targets:
            t.below = t.equal = t.found = 0
            t.pieces = None
            t.overflow = False

    def update(self, x: torch.Tensor) -> None:
        """Observe the next (n, C) chunk of the rows (float32, any device)."""
        c = x.shape[1]
        whole = self._seen == 0 and c == self.total
        self._seen += c
        by_row: dict[int, list[_Target]] = {}
        for t in self.targets:
            if t.mode != "done":
                by_row.setdefault(t.row, []).append(t)
        if not whole and x.device.type == "cpu" and all(t.mode == "bracket" for ts in by_row.values() for t in ts):
            # the common case: each row's bracket work is independent NumPy work; rows in parallel
            parts = parallel_map(
                lambda item: [(t, self._bracket_scan(t, x[item[0]])) for t in item[1]], list(by_row.items())
            )
            for row_parts in parts:
                for t, part in row_parts:
                    self._bracket_add(t, part)
            return
        for r, targets in by_row.items():
            row = x[r]
            if whole:
                for t in targets:
                    t.value, t.mode = kth_smallest(row, t.rank), "whole"
                continue
            keys = None
            if any(t.mode in ("histogram", "fine") for t in targets):
                keys = float_keys(row)
            if any(t.mode == "histogram" for t in targets):
                counts = torch.bincount(((keys >> 16) + 32768).long(), minlength=_BINS)
                self._hist[r] = counts if r not in self._hist else self._hist[r] + counts
            fine_bins = set()
            for t in targets:
                if t.mode == "bracket":
                    self._bracket_update(t, row)
                elif t.mode == "fine" and t.coarse_bin not in fine_bins:
                    fine_bins.add(t.coarse_bin)  # one fine histogram per (row, bin), shared by its targets
                    sel = keys[(keys >> 16) == t.coarse_bin - 32768] & 0xFFFF
                    counts = torch.bincount(sel.long(), minlength=_BINS)
                    key = ("fine", r, t.coarse_bin)
                    self._hist[key] = counts if key not in self._hist else self._hist[key] + counts  # type: ignore[index]

    def update_block(self, x: torch.Tensor) -> None:
        """Observe some columns of the rows, from any thread, in any order (while `blockwise`):
        a bracket only counts and collects, and the k-th value of what it collected does not
        depend on the order it was collected in."""
        parts = [(t, self._bracket_scan(t, x[t.row])) for t in self.targets if t.mode == "bracket"]
        with self._lock:
            self._seen += x.shape[1]
            for t, part in parts:
                self._bracket_add(t, part)

    def row_brackets(self) -> list[list[tuple[float, float]]] | None:
        """Per row, the (lo, hi) of its targets, when rows 0..n-1 all have the same number of
        targets and each is an open value bracket (the case a caller may scan itself, then
        `add_scanned`); None otherwise."""
        if not self.blockwise or any(t.mode != "bracket" for t in self.targets):
            return None
        rows: list[list[tuple[float, float]]] = []
        for t in self.targets:  # targets are stored row by row
            if t.row == len(rows):
                rows.append([])
            elif t.row != len(rows) - 1:
                return None
            rows[-1].append((t.lo, t.hi))
        return rows if len({len(r) for r in rows}) == 1 else None

    def add_scanned(self, width: int, below: list[int], inside: list[np.ndarray | int]) -> None:
        """Add a block of `width` columns scanned against `row_brackets()` by the caller (any
        thread): per target, row by row, the count below and the values inside (for a point
        bracket, lo == hi, the count of values equal to it)."""
        with self._lock:
            self._seen += width
            for t, b, v in zip(self.targets, below, inside):
                self._bracket_add(t, (b, v, None) if t.lo == t.hi else (b, 0, v))

    def _bracket_update(self, t: _Target, row: torch.Tensor) -> None:
        self._bracket_add(t, self._bracket_scan(t, row))

    def _bracket_scan(self, t: _Target, row: torch.Tensor) -> tuple[int, int, np.ndarray | None]:
        """(values below the bracket, values equal to a point bracket, values inside it)."""
        lo, hi = t.lo, t.hi
        if lo == hi:  # a point bracket (e.g. a mass of zeros): counts suffice
            return count_below(row, lo), count_equal(row, lo), None
        # the bracket is narrow: count below it, collect the few values inside
        if t.overflow:
            return count_below(row, lo), 0, None
        below, inside = bracket_scan(row, lo, hi)
        return below, 0, inside.numpy()

    def _bracket_add(self, t: _Target, part: tuple[int, int, np.ndarray | None]) -> None:
        below, equal, inside = part
        t.below += below
        t.equal += equal
        if inside is None or t.overflow:
            return
        t.found += inside.size
        if t.found > self.cap:
            t.overflow = True
            t.pieces = None
        elif inside.size:
            if t.pieces is None:
                t.pieces = GrowableArray(np.float32)
            t.pieces.append(inside)

    def end_pass(self) -> None:
        if self._seen != self.total:
            raise RuntimeError(f"a pass saw {self._seen} values per row, expected {self.total}")
        brackets = [t for t in self.targets if t.mode == "bracket"]
        for t in self.targets:
            if t.mode == "bracket":
                continue
            if t.mode == "whole":
                t.mode = "done"
            elif t.mode == "histogram":
                hist = self._hist[t.row].cpu()
                cum = torch.cumsum(hist, 0)
                b = int(torch.searchsorted(cum, torch.tensor(t.rank), right=True))
                t.coarse_bin = b
                t.rank_in_bin = t.rank - (int(cum[b - 1]) if b > 0 else 0)
                t.mode = "fine"
            elif t.mode == "fine":
                hist = self._hist[("fine", t.row, t.coarse_bin)].cpu()  # type: ignore[index]
                cum = torch.cumsum(hist, 0)
                low = int(torch.searchsorted(cum, torch.tensor(t.rank_in_bin), right=True))
                key = ((t.coarse_bin - 32768) << 16) | low
                t.value = key_to_float(key)
                t.mode = "done"
        # the brackets' selections are independent NumPy work: the targets in parallel
        parallel_map(self._bracket_resolve, brackets)
        self._hist = {}

    def _bracket_resolve(self, t: _Target) -> None:
        j = t.rank - t.below  # position inside the bracket [lo, hi]
        if t.lo == t.hi:
            if 0 <= j < t.equal:
                t.value, t.mode = t.lo, "done"
            else:
                t.mode = "histogram"
        elif not t.overflow and 0 <= j < t.found:
            t.value = float(np.partition(t.pieces.view(), j)[j])  # introselect: the k-th value, as a sort gives it
            t.mode = "done"
        else:
            t.mode = "histogram"  # the bracket missed (or overflowed): exact fallback
        t.pieces = None


class RowMax:
    """Running maximum of each row."""

    def __init__(self, n: int):
        self.n = n
        self.values: torch.Tensor | None = None
        self._lock = threading.Lock()

    def update(self, x: torch.Tensor) -> None:
        """Observe some columns of the rows (from any thread, in any order)."""
        self.update_max(torch.amax(x, dim=1))

    def update_max(self, m: torch.Tensor) -> None:
        """Observe the per-row maxima `m` (n,) of some columns (from any thread, in any order)."""
        with self._lock:
            self.values = m if self.values is None else torch.maximum(self.values, m)

    def result(self) -> list[float]:
        assert self.values is not None
        return [float(v) for v in self.values.cpu()]


class RowSum:
    """Sum of each row in float64 (counts of ±1 stay exact)."""

    def __init__(self, n: int):
        self.n = n
        self.values = torch.zeros(n, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        self.values += torch.sum(x, dim=1, dtype=torch.float64).cpu()

    def result(self) -> list[float]:
        return [float(v) for v in self.values]
