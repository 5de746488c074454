"""Per-model coefficient search (the PCB paper's optional step) with CMA-ES.

Why CMA-ES (the `cma` package): the objective is a noisy black box over a handful of
continuous, box-bounded coefficients, which is what CMA-ES is built for; `cma` is small,
pure Python on numpy, seedable, and handles box bounds itself. (The reference uses
nevergrad's NGOpt, whose choice of algorithm changes with the budget and the nevergrad
version, which makes runs harder to reproduce.)

For PCB and linear methods the λ-independent part is computed once: the PCB scores s_i and
the clipped task vectors τ̃_i (steps 1–6), or the task vectors for task arithmetic; each
evaluation only repeats the weighted combination (step 7). Other methods re-merge per
evaluation. Search on a validation split, never on the test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from mcomp.merge.memory import INMEMORY_ELEMS, MemorySink, merge_state_dicts
from mcomp.merge.methods.pcb import combine
from mcomp.merge.registry import Segment
from mcomp.merge.sources import MemorySource
from mcomp.merge.streaming import MergeEngine

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    weights: list[float]
    score: float
    evaluations: int
    history: list[tuple[list[float], float]] = field(default_factory=list)


class PreparedMerge:
    """The λ-independent part of a merge, kept in memory; `merge(weights)` repeats step 7 only."""

    def __init__(
        self, base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], method: str = "pcb", **params
    ):
        self.base = base
        self.method_name = method
        params = {k: v for k, v in params.items() if k != "weights"}
        self.scale = float(params.get("scale", 1.0))
        src = MemorySource(base, "base")
        self.engine = MergeEngine(
            src,
            [MemorySource(m, f"model {i}") for i, m in enumerate(models)],
            method,
            inmemory_elems=INMEMORY_ELEMS,
            **params,
        )
        self.n = len(models)
        self.parts: list[tuple[tuple[Segment, ...], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        if method not in ("pcb", "task_arithmetic", "linear"):
            self.models = models
            self.params = params
            return
        m = self.engine.method()
        for group in self.engine.groups():
            chunks = self.engine.chunks(group)
            stats = self.engine.group_stats(m, group, chunks, [False] * len(chunks))
            for chunk in chunks:
                b, tau = self.engine.read(chunk)
                if method == "pcb":
                    s, clipped = m.scores(tau, stats)
                else:
                    s, clipped = None, tau
                self.parts.append((chunk.segments, b, s, clipped))

    def merge(self, weights: list[float]) -> dict[str, torch.Tensor]:
        if not self.parts:
            return merge_state_dicts(self.base, self.models, self.method_name, weights=list(weights), **self.params)
        sink = MemorySink(self.engine.base.infos)
        for k in self.engine.copy_keys:
            sink.copy(k, self.base[k])
        w = torch.tensor(weights, dtype=torch.float32).unsqueeze(1)
        for segments, b, s, clipped in self.parts:
            if self.method_name == "pcb":
                delta = combine(clipped, s, list(weights), self.scale)
            else:
                ww = w / w.sum() if self.method_name == "linear" else w
                delta = (clipped * ww).sum(0) * self.scale
            pos = 0
            for seg in segments:
                sink.put(seg, b[pos : pos + seg.size], delta[pos : pos + seg.size])
                pos += seg.size
        return {k: sink.out[k] for k in self.base}


def cma_search(
    loss: Callable[[list[float]], float],
    n: int,
    *,
    bounds: tuple[float, float] = (0.8, 1.3),
    budget: int = 100,
    seed: int = 0,
    sigma: float | None = None,
) -> tuple[list[float], float, list[tuple[list[float], float]]]:
    """Minimise `loss(w)` over w in [low, high]^n with CMA-ES; returns (best w, best loss, history).

    `budget`: loss evaluations. Same seed, same loss -> same result.
    """
    import cma

    lo, hi = map(float, bounds)
    if not lo < hi:
        raise ValueError(f"parameter 'bounds' must be (low, high) with low < high, got {bounds}")
    if budget < 1:
        raise ValueError(f"parameter 'budget' must be >= 1, got {budget}")
    history: list[tuple[list[float], float]] = []

    def evaluate(x) -> float:
        w = [min(max(float(v), lo), hi) for v in x[:n]]
        value = float(loss(w))
        history.append((w, value))
        return value

    x0 = [min(max(1.0, lo), hi)] * n
    if n == 1:  # CMA-ES needs two dimensions; search a 1-D line by a padded dummy coordinate
        x0 = x0 + [0.5 * (lo + hi)]
    opts = {
        "bounds": [lo, hi],
        "seed": (int(seed) % (2**31 - 2)) + 1,
        "maxfevals": budget,
        "verbose": -9,
        "tolfun": 1e-12,
        "tolx": 1e-9,
    }
    es = cma.CMAEvolutionStrategy(x0, sigma if sigma is not None else 0.3 * (hi - lo), opts)
    while not es.stop() and len(history) < budget:
        xs = es.ask()[: budget - len(history)]
        if len(xs) < es.popsize:
            for x in xs:
                evaluate(x)
            break
        es.tell(xs, [evaluate(x) for x in xs])
    best_w, best = min(history, key=lambda h: h[1])
    return best_w, best, history


def search_coefficients(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    objective: Callable[[dict[str, torch.Tensor]], float],
    *,
    method: str = "pcb",
    bounds: tuple[float, float] = (0.8, 1.3),
    budget: int = 100,
    seed: int = 0,
    maximize: bool = False,
    sigma: float | None = None,
    **params,
) -> SearchResult:
    """Search per-model λ_i in `bounds` minimising (or maximising) `objective(merged_state_dict)`.

    `budget`: objective evaluations. Same seed, same objective -> same result.
    """
    prepared = PreparedMerge(base, models, method, **params)
    sign = -1.0 if maximize else 1.0
    best_w, best, history = cma_search(
        lambda w: sign * float(objective(prepared.merge(w))),
        len(models),
        bounds=bounds,
        budget=budget,
        seed=seed,
        sigma=sigma,
    )
    history = [(w, sign * v) for w, v in history]
    logger.info("coefficient search: %d evaluations, best %s -> %.6g", len(history), best_w, sign * best)
    return SearchResult(weights=best_w, score=sign * best, evaluations=len(history), history=history)
