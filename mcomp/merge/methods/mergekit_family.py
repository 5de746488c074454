"""mergekit's generalized task arithmetic and `linear`, as mergekit computes them, for configs written in
mergekit's schema (`mcomp.merge.mergekit_schema`). Not registered by name: mcomp's own `ties`, `dare_ties`,
... follow the papers' released code; these classes are what the same names mean in a mergekit config.

Generalized task arithmetic (`task_arithmetic`, `ties`, `dare_ties`, `dare_linear`, `breadcrumbs`,
`breadcrumbs_ties`, `della`, `della_linear`), per tensor and in the compute dtype (mergekit's `dtype`, else
the inputs'), with the same torch calls as mergekit's `generalized_task_arithmetic.py` and `sparsify.py`:

1. δ_i = θ_i − θ0 in the compute dtype; sparsified per model with that model's `density` (`gamma`,
   `epsilon`): `magnitude` keeps the max(1, int(density·N)) largest |δ| (mergekit's argsort, so ties at the
   threshold break as there), `magnitude_outliers` the int(density·N) after the int(gamma·N) largest,
   `random` (DARE) and `della_magprune` (DELLA) keep at random; `rescale` multiplies the kept entries by
   ||δ||₁ / ||kept||₁ (mergekit's l1 rescale).
2. Multiplied by the model's `weight`; with sign consensus, entries whose sign is that of Σ_i w_i δ_i (+ where
   the sum is ≥ 0) are summed, else all; `normalize` divides by the sum of the counted weights (1 where 0),
   or by Σ w_i (1 where |Σ| < 1e-8); `lambda` multiplies.

Random draws: mcomp's reproducible per-(tensor, model) streams (`family.MaskStream`, seed 0), where mergekit
draws from torch's global generator; DARE and DELLA are therefore equal to mergekit's in distribution, not
bit for bit (equal exactly at density 1).

`linear`: Σ_i w_i θ_i / Σ_i w_i (`normalize`, the default) or Σ_i w_i θ_i, over every listed model (the base
too, if listed), in float32; the engine's base is then all zeros, so its task vectors are the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mcomp.merge.memory import resolve_dtype
from mcomp.merge.methods.family import MaskStream
from mcomp.merge.methods.gta import l1_rescaled, rank_probabilities
from mcomp.merge.registry import Chunk, MergeMethod, MethodParams, _count, _number

DIVISOR_EPS = 1e-8


def _per_model(p: MethodParams, name: str, n: int, lo: float, hi: float) -> None:
    values = getattr(p, name)
    if values is None:
        return
    if len(values) != n:
        raise ValueError(f"parameter {name!r} has {len(values)} value(s) for {n} model(s)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"parameter {name!r} must hold numbers in [{lo}, {hi}], got {list(values)}")
    setattr(p, name, tuple(float(v) for v in values))


@dataclass
class MergekitGtaParams(MethodParams):
    """Per model (non-base): `weights` (mergekit `weight`, required), `densities`, `gammas`, `epsilons`;
    shared: `normalize`, `rescale`, `int8_mask` (mergekit's mask storage: no effect on the result), `scale`
    (mergekit `lambda`), `compute_dtype`."""

    densities: tuple[float, ...] | None = None
    gammas: tuple[float, ...] | None = None
    epsilons: tuple[float, ...] | None = None
    normalize: bool = False
    rescale: bool = False
    int8_mask: bool = False
    compute_dtype: str | None = None
    seed: int = 0

    def validate(self, n: int) -> None:
        super().validate(n)
        if self.weights is None:
            raise ValueError("parameter 'weight' is required for every model (mergekit has no default)")
        _per_model(self, "densities", n, 0.0, float("inf"))
        _per_model(self, "gammas", n, 0.0, 1.0)
        _per_model(self, "epsilons", n, 0.0, 1.0)
        for name in ("normalize", "rescale", "int8_mask"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"parameter {name!r} must be true or false, got {getattr(self, name)!r}")
        resolve_dtype(self.compute_dtype)
        _count(self, "seed")


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's `magnitude`: 1 at the max(1, int(density·N)) largest |δ| (its argsort), else 0."""
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return mask.reshape_as(delta)


def outliers_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's `magnitude_outliers`: drop the int(gamma·N) largest |δ|, keep the next int(density·N)."""
    numel = delta.numel()
    target = int(density * numel)
    bottom = max(0, numel - target - int(gamma * numel))
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    indices = torch.sort(w, descending=False).indices
    mask = torch.zeros(numel, dtype=delta.dtype, device=delta.device)
    mask[indices[bottom : bottom + target]] = 1
    return mask.reshape_as(delta)


class MergekitGta(MergeMethod):
    """One tensor at a time; subclasses choose the sparsifier and the consensus (mergekit's table)."""

    Params = MergekitGtaParams
    whole_tensors = True
    sparsification: ClassVar[str | None] = None  # magnitude | random | magnitude_outliers | della_magprune
    consensus: ClassVar[bool] = False

    def __init__(self, params, n):
        super().__init__(params, n)
        self.draws = MaskStream(params.seed, 0.0)

    def work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """mergekit's random sparsifiers upcast float16 on the CPU (torch.bernoulli has no float16 there)."""
        return torch.float32 if dtype == torch.float16 else dtype

    def sparsify(self, delta: torch.Tensor, name: str, model: int) -> torch.Tensor:
        density = self.p.densities[model] if self.p.densities is not None else 1.0
        if self.sparsification is None or density >= 1:
            return delta
        rescale = l1_rescaled if self.p.rescale else (lambda x, mask: x * mask)
        if self.sparsification == "magnitude":
            if density <= 0 or delta.numel() == 0:
                return torch.zeros_like(delta)
            return rescale(delta, magnitude_mask(delta, density))
        if self.sparsification == "magnitude_outliers":
            gamma = self.p.gammas[model] if self.p.gammas is not None else 0.01
            return rescale(delta, outliers_mask(delta, density, gamma))
        work = delta.to(self.work_dtype(delta.dtype))
        uniform = self.draws.uniform(name, model, 0, delta.numel()).to(work.device).view_as(work)
        if self.sparsification == "random":
            mask = (uniform < density).to(work.dtype)
        else:
            if density <= 0:
                return torch.zeros_like(delta)
            epsilon = self.p.epsilons[model] if self.p.epsilons is not None else 0.15
            if density + epsilon >= 1 or density - epsilon <= 0:
                raise ValueError(f"tensor {name!r}: DELLA needs density ± epsilon in (0, 1), got {density} ± {epsilon}")
            mask = (uniform < rank_probabilities(work, density, epsilon)).to(work.dtype)
        return rescale(work, mask).to(delta.dtype)

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        (seg,) = chunk.segments
        shape = seg.shape or (seg.size,)
        dtype = resolve_dtype(self.p.compute_dtype) or torch.float32
        deltas = torch.empty((self.n, *shape), dtype=dtype, device=tau.device)
        for i in range(self.n):
            deltas[i] = self.sparsify(tau[i].view(shape).to(dtype), seg.name, i)
        weights = torch.tensor(self.p.weights, dtype=dtype, device=tau.device)
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)
        if self.consensus:
            majority = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1
            mask = deltas.sign().to(dtype) == majority
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < DIVISOR_EPS] = 1
        if self.p.normalize:
            mixed /= divisor
        if self.p.scale != 1:
            mixed *= self.p.scale
        return mixed.reshape(-1).float()


def _gta(name: str, sparsification: str | None, consensus: bool) -> type:
    attrs = {
        "name": name,
        "sparsification": sparsification,
        "consensus": consensus,
        "description": f"mergekit's {name}",
    }
    return type(f"Mergekit_{name}", (MergekitGta,), attrs)


# mergekit's registry (`merge_methods/registry.py`): sparsifier and sign consensus (the parameters' defaults,
# normalize and rescale among them, are `mergekit_schema.METHODS`')
GTA_METHODS: dict[str, type[MergekitGta]] = {
    "task_arithmetic": _gta("task_arithmetic", None, False),
    "ties": _gta("ties", "magnitude", True),
    "dare_ties": _gta("dare_ties", "random", True),
    "dare_linear": _gta("dare_linear", "random", False),
    "breadcrumbs": _gta("breadcrumbs", "magnitude_outliers", False),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", "magnitude_outliers", True),
    "della": _gta("della", "della_magprune", True),
    "della_linear": _gta("della_linear", "della_magprune", False),
}


@dataclass
class MergekitLinearParams(MethodParams):
    """`weights`: every listed model's (mergekit `weight`, required); `normalize` (default true)."""

    normalize: bool = True

    def validate(self, n: int) -> None:
        super().validate(n)
        if self.weights is None:
            raise ValueError("parameter 'weight' is required for every model (mergekit has no default)")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"parameter 'normalize' must be true or false, got {self.normalize!r}")
        if self.normalize and sum(self.weights) == 0:
            raise ValueError("the weights sum to 0: a normalised linear merge would divide by zero")
        _number(self, "scale")


class MergekitLinear(MergeMethod):
    """mergekit's `linear` on a zero base (τ_i = θ_i): float32 Σ w_i θ_i (÷ Σ w_i), as mergekit's kernel."""

    name = "linear"
    Params = MergekitLinearParams
    description = "mergekit's linear: the weighted (normalised) sum of the models"

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict) -> torch.Tensor:
        weight = torch.tensor(self.p.weights, dtype=torch.float32, device=tau.device)
        result = torch.zeros(tau.shape[1], dtype=torch.float32, device=tau.device)
        for i, coefficient in enumerate(weight.unbind(0)):
            result.addcmul_(tau[i], coefficient.reshape(1))
        if self.p.normalize:
            result.div_(weight.sum().reshape(1))
        return result


@dataclass
class MergekitModelStockParams(MethodParams):
    filter_wise: bool = False
    compute_dtype: str | None = None

    def validate(self, n: int) -> None:
        super().validate(n)
        if n < 2:
            raise ValueError("model_stock needs at least two models besides the base")
        if not isinstance(self.filter_wise, bool):
            raise ValueError(f"parameter 'filter_wise' must be true or false, got {self.filter_wise!r}")
        resolve_dtype(self.compute_dtype)


class MergekitModelStock(MergeMethod):
    """mergekit's `model_stock` in the compute dtype, its singular guard included (t = 0 where
    |1 + (N − 1)·cos| < 1e-6); mcomp's registered `model_stock` computes the same rule in float32."""

    name = "model_stock"
    Params = MergekitModelStockParams
    whole_tensors = True
    uses_base = True
    description = "mergekit's model_stock"

    def merge(self, tau: torch.Tensor, chunk: Chunk, stats: dict, base: torch.Tensor | None = None) -> torch.Tensor:
        (seg,) = chunk.segments
        shape = seg.shape or (seg.size,)
        dtype = resolve_dtype(self.p.compute_dtype) or torch.float32
        w_0 = base.to(dtype)
        ws = [(base + tau[i]).to(dtype) for i in range(self.n)]
        if self.p.filter_wise:
            w_0, ws = w_0.view(shape), [w.view(shape) for w in ws]
            if w_0.dim() == 1:
                w_0, ws = w_0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
        offsets = [w - w_0 for w in ws]
        cosines = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1 :]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        denominator = 1 + (self.n - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), (self.n * cos) / torch.where(singular, 1, denominator))
        merged = t * (sum(ws) / self.n) + (1 - t) * w_0
        return merged.reshape(-1).float() - base
