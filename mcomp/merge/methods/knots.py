"""KnOTS (Stoica, Ramesh et al. 2025), exact to gstoica27/KnOTS (`SVDMerger`): LoRA updates are merged in a
subspace they share. Per 2-D tensor, the tasks' updates side by side, M = [ΔW_1 | … | ΔW_T] (O × T·I), are
decomposed in float64, M = U Σ Vᵀ, keeping the singular values above `threshold` (1e-5); task t is then
R_t = Σ · Vᵀ[:, t·I:(t+1)·I] (k × I) in the shared basis U. The chosen `base_method` (any registered
method: `ties` as KnOTS-TIES, `dare_ties`, `task_arithmetic`, …) merges the R_t as task vectors, over
all tensors at once (its own scope: TIES's top-k is model-wide, as released), with its parameters
`base_params` and this method's `weights` and `scale` (the release's α), and ΔW = U · R_merged.
Tensors that are not 2-D take part in the base merge as they are.

ΔW_t is the update as the model applies it, s·B·A (the release multiplies B·A without peft's α/r, which
its configs set to 1). All R_t are held in memory until the base merge has run, as the release holds
them; for LoRA inputs they are small (k ≤ T·r rows). A full-rank delta makes each R_t as large as the
tensor itself, so KnOTS is meant for LoRA inputs (merges of LoRA adapters, and compose's text adapters).

Where every input holds a tensor's update as factors (`LowRank`: LoRA adapters), the same SVD is taken
from them (`factors`, default true): with L = [s_1·B_1 | … | s_T·B_T] = Q·R_L (QR, O × T·r) and
blockdiag(A_1, …, A_T), M = Q · (R_L · blockdiag(A)), so the SVD of that (T·r × T·I) matrix gives
M's with U = Q·U'. That is the released decomposition without its O × T·I float64 SVD; it keeps M's
exact rank, where the release decomposes the float32 product B·A, whose rounding adds singular values
of about 1e-7·‖ΔW‖ that the 1e-5 threshold drops for updates of ordinary size. `factors: false` takes
the dense path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _number, get_method, register


@dataclass
class KnotsParams(MethodParams):
    base_method: str = "ties"
    base_params: dict[str, Any] = field(default_factory=dict)
    threshold: float = 1e-5
    factors: bool = True

    def validate(self, n: int) -> None:
        super().validate(n)
        if self.base_method == "knots":
            raise ValueError("parameter 'base_method' must be another merge method than knots")
        get_method(self.base_method)  # names the registered ones if it is not one
        if not isinstance(self.base_params, dict):
            raise ValueError(f"parameter 'base_params' must be a mapping, got {self.base_params!r}")
        clash = sorted({"weights", "scale", "lambda"} & set(self.base_params))
        if clash:
            raise ValueError(f"give {clash} as knots' own parameters, not in 'base_params'")
        _number(self, "threshold", 0.0)
        if not isinstance(self.factors, bool):
            raise ValueError(f"parameter 'factors' must be true or false, got {self.factors!r}")


def _svd_of_factors(factors: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (float64) of [left_1 @ right_1 | … | left_T @ right_T] from the factors alone."""
    left = torch.cat([f.left.to(device, torch.float64) for f in factors], dim=1)
    q, r = torch.linalg.qr(left)
    inner = r @ torch.block_diag(*[f.right.to(device, torch.float64) for f in factors])
    u, s, vh = torch.linalg.svd(inner, full_matrices=False)
    return q @ u, s, vh


class _Stash:
    """The SVD stage keeps its results in the statistics, not in a reducer."""

    def update(self, x: torch.Tensor) -> None:
        pass


@register
class Knots(MergeMethod):
    name = "knots"
    Params = KnotsParams
    whole_tensors = True
    takes_factors = True
    description = "KnOTS: LoRA updates aligned in their shared SVD basis, then merged by a base method"

    def scope(self) -> str:
        return "global"

    def num_stages(self) -> int:
        return 1

    def reducers(self, stage: int, d: int) -> dict:
        return {"svd": _Stash()}

    def observe(self, stage, tau, chunk, stats, reducers):
        (seg,) = chunk.segments
        aligned = stats.setdefault("aligned", {})
        if len(seg.shape) != 2:
            aligned[seg.name] = (None, [tau[i].clone() for i in range(self.n)])
            return
        rows, cols = seg.shape
        factors = self.low_rank_inputs(seg.name) if self.p.factors else None
        if factors is not None:
            u, s, vh = _svd_of_factors(factors, tau.device)
        else:
            side_by_side = torch.cat([tau[i].view(rows, cols) for i in range(self.n)], dim=1).double()
            u, s, vh = torch.linalg.svd(side_by_side, full_matrices=False)
        keep = s > self.p.threshold
        u, s, vh = u[:, keep].float(), s[keep].float(), vh[keep].float()
        blocks = torch.diag(s) @ vh
        aligned[seg.name] = (u, [blocks[:, i * cols : (i + 1) * cols].contiguous() for i in range(self.n)])

    def finish(self, stage, reducers, stats):
        from mcomp.merge.memory import merge_task_vectors

        aligned = stats.pop("aligned", {})
        if not aligned:
            return
        tasks = [{name: blocks[i] for name, (_, blocks) in aligned.items() if blocks[i].numel()} for i in range(self.n)]
        params = dict(self.p.base_params, scale=self.p.scale)
        if self.p.weights is not None:
            params["weights"] = list(self.p.weights)
        merged = merge_task_vectors(tasks, self.p.base_method, **params) if tasks[0] else {}
        stats["merged"] = {name: (u, merged.get(name)) for name, (u, _) in aligned.items()}

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        (seg,) = chunk.segments
        u, merged = stats["merged"].pop(seg.name)  # each tensor is merged once: free its blocks
        if merged is None:  # nothing above the threshold: no update
            return torch.zeros(seg.size, dtype=tau.dtype, device=tau.device)
        out = merged.to(tau.device) if u is None else u.to(tau.device) @ merged.to(tau.device)
        return out.reshape(-1).to(tau.dtype)
