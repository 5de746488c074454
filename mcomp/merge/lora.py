"""LoRA adapters (peft format) as merge inputs: merging happens in ΔW = (α/r)·B·A space.

Merging A and B separately (peft's non-SVD combinations, ModelCompose `sum`/`mean`) is a
different operation; the spec asks for ΔW. Three ways out:

* `lora_linear_terms`: a linear combination kept exact and unmaterialised — per target
  weight the list of (coefficient, A, B) so that Δy = Σ c_i (x Aᵢᵀ) Bᵢᵀ (`apply_linear_terms`).
* fold: merged ΔW added to the base weights (`merge_lora_adapters` + the engine's checkpoint
  output; `LoraSource` exposes an adapter as a model whose task vector is exactly ΔW).
* re-factorise: truncated SVD of the merged ΔW to rank r' (`refactorise`, `LoraSink`), with
  the relative Frobenius reconstruction error reported per weight and overall.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

import torch

from mcomp.merge.memory import merge_task_vectors
from mcomp.merge.registry import Segment, get_method
from mcomp.merge.sources import LowRank, Source, TensorInfo
from mcomp.merge.streaming import Sink
from mcomp.peft_format import read_peft_lora, write_adapter

logger = logging.getLogger(__name__)


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank/alpha patterns: a key matches a module name by full match or dotted suffix."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


@dataclass
class LoraModule:
    """One adapted weight: ΔW = scaling · B @ A (transposed if fan_in_fan_out)."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float
    fan_in_fan_out: bool = False

    def delta(self) -> torch.Tensor:
        d = (self.B.float() @ self.A.float()).mul_(self.scaling)
        return d.T.contiguous() if self.fan_in_fan_out else d

    def delta_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the weight-shaped ΔW."""
        if self.fan_in_fan_out:
            return (self.B.float() @ self.A.float()[:, r0:r1]).T.mul_(self.scaling)
        return (self.B.float()[r0:r1] @ self.A.float()).mul_(self.scaling)

    def low_rank(self) -> LowRank:
        """ΔW as factors: (s·B) @ A, or Aᵀ @ (s·B)ᵀ for a fan_in_fan_out weight."""
        if self.fan_in_fan_out:
            return LowRank(self.A.float().T, self.B.float().T * self.scaling)
        return LowRank(self.B.float() * self.scaling, self.A.float())


@dataclass
class LoraAdapter:
    path: str
    config: dict
    modules: dict[str, LoraModule]  # base weight key (e.g. model.layers.0.self_attn.q_proj.weight) -> module


def load_lora(path: str | os.PathLike) -> LoraAdapter:
    """Read a peft LoRA adapter directory (`mcomp.peft_format.read_peft_lora`; tensors other than the
    LoRA factors are skipped) with each module's scaling (alpha and rank patterns, rsLoRA)."""
    config, pairs = read_peft_lora(path, strict=False)
    alpha = config.get("lora_alpha", 8)
    modules = {}
    for module, (a_factor, b_factor) in pairs.items():
        r = a_factor.shape[0]
        a = _pattern_value(config.get("alpha_pattern"), module, alpha)
        scaling = a / math.sqrt(r) if config.get("use_rslora") else a / r
        modules[f"{module}.weight"] = LoraModule(a_factor, b_factor, float(scaling), bool(config.get("fan_in_fan_out")))
    if not modules:
        raise ValueError(f"{path}: no LoRA weights found")
    return LoraAdapter(str(path), config, modules)


def lora_target_keys(adapters: list[LoraAdapter]) -> list[str]:
    """Base weight keys adapted by any of the adapters (sorted)."""
    return sorted(set().union(*(a.modules for a in adapters)))


def lora_deltas(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """ΔW per adapted base weight (float32)."""
    return {k: m.delta() for k, m in adapter.modules.items()}


def merge_lora_adapters(
    adapters: list[LoraAdapter], method: str = "task_arithmetic", **params
) -> dict[str, torch.Tensor]:
    """Merge adapters in ΔW space; a weight an adapter does not touch has ΔW = 0 for it."""
    keys = lora_target_keys(adapters)
    shapes = {}
    for a in adapters:
        for k, m in a.modules.items():
            out_dim = m.A.shape[1] if m.fan_in_fan_out else m.B.shape[0]
            in_dim = m.B.shape[0] if m.fan_in_fan_out else m.A.shape[1]
            shape = (out_dim, in_dim)
            if shapes.setdefault(k, shape) != shape:
                raise ValueError(
                    f"LoRA weight {k!r}: ΔW shape {list(shape)} in {a.path} but {list(shapes[k])} elsewhere"
                )
    factored = get_method(method).takes_factors  # as factors to a method that takes them (KnOTS)

    def update(adapter: LoraAdapter, key: str):
        if key in adapter.modules:
            return adapter.modules[key].low_rank() if factored else adapter.modules[key].delta()
        rows, cols = shapes[key]
        return LowRank.zero(rows, cols) if factored else torch.zeros(rows, cols)

    return merge_task_vectors([{k: update(a, k) for k in keys} for a in adapters], method, **params)


def lora_linear_terms(
    adapters: list[LoraAdapter], weights: list[float] | None = None, scale: float = 1.0
) -> dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]]:
    """Per adapted weight, [(c_i, A_i, B_i)] with c_i = scale·w_i·(α_i/r_i): ΔW = Σ c_i B_i A_i, never formed."""
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise ValueError(f"parameter 'weights' has {len(weights)} value(s) for {len(adapters)} adapter(s)")
    terms: dict[str, list] = {}
    for w, a in zip(weights, adapters):
        for k, m in a.modules.items():
            if m.fan_in_fan_out:
                raise ValueError(f"{a.path}: fan_in_fan_out adapters are not supported by lora_linear_terms")
            terms.setdefault(k, []).append((scale * w * m.scaling, m.A, m.B))
    return terms


def apply_linear_terms(terms: list[tuple[float, torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """Δy = Σ c_i (x A_iᵀ) B_iᵀ for inputs x (..., in): the exact merged LoRA update of a Linear."""
    out = None
    for c, A, B in terms:
        y = (x @ A.to(x.dtype).T) @ B.to(x.dtype).T * c
        out = y if out is None else out + y
    return out


def refactorise(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD: (A (r', in), B (out, r'), relative Frobenius error) with ΔW ≈ B @ A.

    The singular values are split evenly (B = U√S, A = √S Vᵀ) so neither factor dominates.
    """
    if rank < 1:
        raise ValueError(f"parameter 'lora_rank' must be >= 1, got {rank}")
    d = delta.float()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    B = U[:, :r] * root
    A = root.unsqueeze(1) * Vh[:r]
    norm = float(torch.linalg.norm(d))
    err = float(torch.linalg.norm(d - B @ A)) / norm if norm > 0 else 0.0
    return A.contiguous(), B.contiguous(), err


class LoraSource(Source):
    """A base model plus a LoRA adapter, seen as a model whose task vector is exactly ΔW."""

    def __init__(self, base: Source, adapter: LoraAdapter, name: str | None = None):
        self.base = base
        self.adapter = adapter
        self.name = name or adapter.path
        self.infos = base.infos
        for key, m in adapter.modules.items():
            if key not in base.infos:
                raise ValueError(f"adapter {self.name!r}: target weight {key!r} is not in base {base.name!r}")
            shape = base.infos[key].shape
            want = (m.A.shape[1], m.B.shape[0]) if m.fan_in_fan_out else (m.B.shape[0], m.A.shape[1])
            if tuple(shape) != want:
                raise ValueError(
                    f"adapter {self.name!r}: ΔW of {key!r} has shape {list(want)} but the base weight has {list(shape)}"
                )

    stores_weights = False  # the task vector comes from `read_delta`

    def read(self, key, start, stop):
        return self.base.read(key, start, stop)

    def read_delta(self, key, start, stop, base):
        m = self.adapter.modules.get(key)
        if m is None:
            return torch.zeros(stop - start)
        cols = self.infos[key].shape[1]
        r0, r1 = start // cols, -(-stop // cols)
        rows = m.delta_rows(r0, r1).reshape(-1)
        return rows[start - r0 * cols : stop - r0 * cols]

    def low_rank(self, key):
        m = self.adapter.modules.get(key)
        if m is not None:
            return m.low_rank()
        if len(self.infos[key].shape) != 2:
            return None
        return LowRank.zero(*self.infos[key].shape)  # not adapted: ΔW = 0


class LoraSink(Sink):
    """Collects merged ΔW per adapted weight and re-factorises each to rank r' when complete."""

    def __init__(self, infos: dict[str, TensorInfo], adapters: list[LoraAdapter], rank: int):
        if rank < 1:
            raise ValueError(f"parameter 'lora_rank' must be >= 1, got {rank}")
        self.infos = infos
        self.adapters = adapters
        self.rank = rank
        self._buf: dict[str, torch.Tensor] = {}
        self._filled: dict[str, int] = {}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.errors: dict[str, float] = {}
        self._sq = [0.0, 0.0]  # Σ ||ΔW − BA||², Σ ||ΔW||²
        self.fan_in_fan_out = bool(adapters[0].config.get("fan_in_fan_out"))

    def copy(self, name, tensor):
        pass  # unmerged base tensors are not part of an adapter

    def put(self, seg: Segment, base, delta):
        info = self.infos[seg.name]
        buf = self._buf.setdefault(seg.name, torch.empty(info.numel, dtype=torch.float32))
        buf[seg.start : seg.stop] = delta.cpu()
        self._filled[seg.name] = self._filled.get(seg.name, 0) + seg.size
        if self._filled[seg.name] == info.numel:
            d = self._buf.pop(seg.name).reshape(info.shape)
            A, B, err = refactorise(d.T if self.fan_in_fan_out else d, self.rank)
            self.factors[seg.name] = (A, B)
            self.errors[seg.name] = err
            norm2 = float(torch.linalg.norm(d)) ** 2
            self._sq[0] += err * err * norm2
            self._sq[1] += norm2

    @property
    def total_error(self) -> float:
        return math.sqrt(self._sq[0] / self._sq[1]) if self._sq[1] > 0 else 0.0

    def save(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
        """Write a peft adapter (r = lora_alpha = r', so the scaling is 1)."""
        pairs = {key[: -len(".weight")]: (A.to(dtype), B.to(dtype)) for key, (A, B) in self.factors.items()}
        config = dict(self.adapters[0].config)
        targets: set[str] = set()
        for a in self.adapters:
            t = a.config.get("target_modules")
            if isinstance(t, list):
                targets.update(t)
        if not targets:
            targets = {k[: -len(".weight")] for k in self.factors}
        rank = max((A.shape[0] for A, _ in self.factors.values()), default=self.rank)
        config.update(
            {
                "r": rank,
                "lora_alpha": rank,
                "target_modules": sorted(targets),
                "use_rslora": False,
                "rank_pattern": {},
                "alpha_pattern": {},
                "fan_in_fan_out": self.fan_in_fan_out,
            }
        )
        write_adapter(directory, pairs, config=config)
        logger.info(
            "re-factorised %d weight(s) to rank %d: relative reconstruction error %.3g overall",
            len(self.factors),
            rank,
            self.total_error,
        )
