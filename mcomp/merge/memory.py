"""Merges of tensors held in memory: state dicts (θ out) and task vectors (merged delta out)."""

from __future__ import annotations

from typing import Any

import torch

from mcomp.merge.registry import Segment
from mcomp.merge.sources import LowRank, MemorySource, ZeroSource
from mcomp.merge.streaming import DEFAULT_SAMPLE, MergeEngine, Sink

INMEMORY_ELEMS = 1 << 24
DTYPE_BY_NAME = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_BY_NAME:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPE_BY_NAME))}")
    return DTYPE_BY_NAME[dtype]


class MemorySink(Sink):
    """Collects the output in memory: θ (base + delta, cast) or the merged delta itself."""

    def __init__(self, infos, out_dtype: torch.dtype | None = None, delta: bool = False):
        self.infos = infos
        self.out_dtype = out_dtype
        self.delta = delta
        self.out: dict[str, torch.Tensor] = {}

    def copy(self, name, tensor):
        self.out[name] = tensor.clone()

    def put(self, seg: Segment, base, delta):
        info = self.infos[seg.name]
        if seg.name not in self.out:
            dtype = torch.float32 if self.delta else (self.out_dtype or info.dtype)
            self.out[seg.name] = torch.empty(info.shape, dtype=dtype)
        value = delta if self.delta else base + delta
        self.out[seg.name].view(-1)[seg.start : seg.stop] = value.to(self.out[seg.name].dtype).cpu()


def _engine_options(chunk_elems, inmemory_elems, sample_size) -> dict:
    return {
        "chunk_elems": chunk_elems or None,  # None: the engine's default for its device
        "inmemory_elems": INMEMORY_ELEMS if inmemory_elems is None else inmemory_elems,
        "sample_size": DEFAULT_SAMPLE if sample_size is None else sample_size,
    }


def merge_state_dicts(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    method: str = "task_arithmetic",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    chunk_elems: int | None = None,
    inmemory_elems: int | None = None,
    sample_size: int | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge fine-tuned state dicts onto `base`; returns θ (base included) in the base's dtypes.

    `params` are the method's (validated) parameters: weights, scale, density, ratio, clip,
    inter, scope, sign, rescale, seed. Tensors that are not floating point are copied from
    the base. The engine options only trade memory for passes; results do not change.
    """
    src = MemorySource(base, "base")
    srcs = [MemorySource(m, f"model {i}") for i, m in enumerate(models)]
    engine = MergeEngine(
        src, srcs, method, device=device, **_engine_options(chunk_elems, inmemory_elems, sample_size), **params
    )
    sink = MemorySink(src.infos, resolve_dtype(dtype))
    engine.run(sink)
    return {k: sink.out[k] for k in base}


def merge_task_vectors(
    deltas: list[dict[str, torch.Tensor | LowRank]],
    method: str = "task_arithmetic",
    *,
    device: str = "cpu",
    chunk_elems: int | None = None,
    inmemory_elems: int | None = None,
    sample_size: int | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge task vectors τ_i directly (deltas in, merged float32 delta out, scale included).

    Same semantics as `merge_state_dicts` with θ0 = 0; used for LoRA, whose task vectors are
    ΔW = (α/r)·B·A (a `LowRank` value holds one as its factors, for methods that take them).
    All deltas must have the same keys and shapes.
    """
    if not deltas:
        raise ValueError("need at least one task vector to merge")
    srcs = [
        MemorySource({k: v if isinstance(v, LowRank) else v.float() for k, v in d.items()}, f"task vector {i}")
        for i, d in enumerate(deltas)
    ]
    base = ZeroSource(srcs[0].infos)
    engine = MergeEngine(
        base, srcs, method, device=device, **_engine_options(chunk_elems, inmemory_elems, sample_size), **params
    )
    sink = MemorySink(base.infos, delta=True)
    engine.run(sink)
    return {k: sink.out[k] for k in deltas[0]}
