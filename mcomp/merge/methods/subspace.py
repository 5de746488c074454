"""Merging in the task matrices' singular subspaces: TSV-M, Iso-C and Iso-CTS, each exact to its released
code (AntoAndGar/task_singular_vectors `compute_and_sum_svd_mem_reduction`; danielm1405/iso-merging
`iso_c`, `iso_cts`). θ = θ0 + scale · τ_merged, τ_merged computed per tensor from the task vectors τ_i:

* TSV-M: each task keeps its top r = int(k/T) singular triplets (k = min(m, n)), placed in task order in
  slots [i·r, (i+1)·r) of k-wide buffers (left-over slots stay zero); τ = polar(U) · diag(S) · polar(Vᵀ),
  polar(X) = U_X V_Xᵀ of X's thin SVD (the closest orthonormal matrix).
* Iso-C: M = Σ_i τ_i; τ = mean(σ(M)) · U_M V_Mᵀ (every singular value replaced by their mean, all k).
* Iso-CTS: the top c singular vectors of M span the common space, c = k − round((k − int(f·k)) / T)·T
  (f = `common_space_fraction`, Python's round); each task's τ_i with its column space projected off it,
  τ_i − U_c U_cᵀ τ_i, gives its top n = (k − c) / T triplets; slots: task 0 … task T−1, then the common
  ones (σ of M); τ = mean(all k slot values) · polar(U) · polar(Vᵀ).

Which tensors are matrices: every 2-D tensor except the keys `average_keys` (a regular expression)
matches; the released CLIP code excludes `text_projection`, which here is `average_keys:
text_projection`, off by default. Other tensors are averaged over the tasks, as released (a running
mean for TSV-M and Iso-CTS, Σ/T for Iso-C). Per-model `weights` multiply the task vectors first
(the released code has none: all 1).

`svd: lowrank` computes the per-task decompositions that keep only a few triplets (TSV-M's r, Iso-CTS's
n) with a seeded randomized range finder instead of a full SVD: faster on large matrices, and close to
the released result only where the task matrices' spectra decay fast (on flat ones the top triplets
are not well separated and the merge moves; scripts/bench_merge.py reports the difference). `svd:
full` (default) is the released computation. The maths runs in float32 on the merge device (`--device cuda` on a GPU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _choice, _count, _number, register

SVD_MODES = ("full", "lowrank")


def thin_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(x, full_matrices=False), retried in float64 where LAPACK's float32 divide-and-conquer
    does not converge (it can fail on matrices with many equal singular values, e.g. a task matrix with
    the common space projected off); the triplets are the same, to float rounding."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        if x.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def polar(x: torch.Tensor) -> torch.Tensor:
    """U Vᵀ of x's thin SVD."""
    u, _, vh = thin_svd(x)
    return u @ vh


def top_svd(x: torch.Tensor, r: int, mode: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U[:, :r], S[:r], Vᵀ[:r]) of x: from the full thin SVD, or a seeded randomized range finder
    (8 extra columns, two power iterations) for `lowrank`."""
    k = min(x.shape)
    if mode == "full" or r >= k:
        u, s, vh = thin_svd(x)
        return u[:, :r], s[:r], vh[:r]
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(x.shape[1], min(r + 8, k), generator=g).to(x)
    q = torch.linalg.qr(x @ omega).Q
    for _ in range(2):
        q = torch.linalg.qr(x.T @ q).Q
        q = torch.linalg.qr(x @ q).Q
    ub, s, vh = thin_svd(q.T @ x)
    return (q @ ub)[:, :r], s[:r], vh[:r]


def running_mean(tau: torch.Tensor) -> torch.Tensor:
    """m ← m + (τ_i − m) / (i + 1), as released (equal to the mean up to float rounding)."""
    out = tau[0].clone()
    for i in range(1, tau.shape[0]):
        out += (tau[i] - out) / (i + 1)
    return out


def common_space_size(k: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(c, n): common-space size and triplets per task, c + tasks·n = k (Iso-CTS's sizing)."""
    c = int(k * fraction)
    specific = round((k - c) / tasks) * tasks
    return k - specific, specific // tasks


@dataclass
class SubspaceParams(MethodParams):
    average_keys: str | None = None  # a regex: 2-D tensors whose names match are averaged, not decomposed
    svd: str = "full"
    seed: int = 0  # of the randomized range finder (svd: lowrank)

    def validate(self, n: int) -> None:
        super().validate(n)
        _choice(self, "svd", SVD_MODES)
        if self.average_keys is not None:
            try:
                re.compile(self.average_keys)
            except (re.error, TypeError) as err:
                raise ValueError(f"parameter 'average_keys' must be a regular expression: {err}") from None
        _count(self, "seed")


@dataclass
class IsoCtsParams(SubspaceParams):
    common_space_fraction: float = 0.8

    def validate(self, n: int) -> None:
        super().validate(n)
        _number(self, "common_space_fraction", 0.0, 1.0)


class SubspaceMethod(MergeMethod):
    """Per tensor: the matrix rule on 2-D tensors, the average on the others."""

    whole_tensors = True
    Params: ClassVar[type[MethodParams]] = SubspaceParams

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        (seg,) = chunk.segments
        w = self.weights_column(tau)
        t = tau if w is None else tau * w
        pattern = self.p.average_keys
        if len(seg.shape) == 2 and not (pattern and re.search(pattern, seg.name)):
            out = self.matrix(t.view(self.n, *seg.shape), seg.name).reshape(-1)
        else:
            out = self.average(t)
        return out.mul_(self.p.scale) if self.p.scale != 1.0 else out

    def average(self, tau: torch.Tensor) -> torch.Tensor:
        return running_mean(tau)

    def matrix(self, tau: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _seed(self, name: str, task: int) -> int:
        from mcomp.merge.methods.family import mask_seed

        return mask_seed(self.p.seed, name, task)


@register
class TaskSingularVectors(SubspaceMethod):
    name = "tsv"
    description = "TSV-M: each task's top 1/T singular triplets, orthogonalised (Gargiulo et al. 2025)"

    def matrix(self, tau: torch.Tensor, name: str) -> torch.Tensor:
        n, (rows, cols) = self.n, tau.shape[1:]
        k = min(rows, cols)
        r = int(k * (1 / n))
        u = tau.new_zeros(rows, k)
        s = tau.new_zeros(k)
        vh = tau.new_zeros(k, cols)
        for i in range(n):
            ui, si, vi = top_svd(tau[i], r, self.p.svd, self._seed(name, i))
            u[:, i * r : (i + 1) * r], s[i * r : (i + 1) * r], vh[i * r : (i + 1) * r] = ui, si, vi
        return torch.linalg.multi_dot((polar(u), torch.diag(s), polar(vh)))


@register
class IsoC(SubspaceMethod):
    name = "iso_c"
    description = "Iso-C: the summed task matrix with a flat spectrum (Marczak et al. 2025)"

    def average(self, tau: torch.Tensor) -> torch.Tensor:
        return tau.sum(0) / self.n

    def matrix(self, tau: torch.Tensor, name: str) -> torch.Tensor:
        u, s, vh = thin_svd(tau.sum(0) / self.n * self.n)
        return s.mean() * (u @ vh)


@register
class IsoCts(SubspaceMethod):
    name = "iso_cts"
    Params = IsoCtsParams
    description = "Iso-CTS: a common and per-task subspaces with a flat spectrum (Marczak et al. 2025)"

    def matrix(self, tau: torch.Tensor, name: str) -> torch.Tensor:
        n, (rows, cols) = self.n, tau.shape[1:]
        k = min(rows, cols)
        c, per_task = common_space_size(k, n, self.p.common_space_fraction)
        if c < 0:
            raise ValueError(
                f"tensor {name!r}: common_space_fraction {self.p.common_space_fraction} leaves a common space of "
                f"{c} dimensions for {n} tasks of rank {k}"
            )
        uc_all, sc_all, vc_all = thin_svd(tau.sum(0))
        uc, sc, vc = uc_all[:, :c], sc_all[:c], vc_all[:c]
        u = tau.new_zeros(rows, k)
        s = tau.new_zeros(k)
        vh = tau.new_zeros(k, cols)
        for i in range(n):
            specific = tau[i] - uc @ uc.T @ tau[i]
            ui, si, vi = top_svd(specific, per_task, self.p.svd, self._seed(name, i))
            span = slice(i * per_task, (i + 1) * per_task)
            u[:, span], s[span], vh[span] = ui, si, vi
        u[:, n * per_task :], s[n * per_task :], vh[n * per_task :] = uc, sc, vc
        return s.mean() * (polar(u) @ polar(vh))
