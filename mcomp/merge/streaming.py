"""The merge engine: validates the inputs, plans chunks, runs each method's passes, feeds a sink.

Memory: one chunk at a time — an (n, C) float32 task-vector matrix plus the method's
temporaries — so peak memory is a small multiple of n × chunk, whatever the model size. A
group (all merged tensors for `global` scope, one tensor for `tensor` scope) that fits in
`inmemory_elems` coordinates is read as a single chunk instead (fewer passes, same numbers).

Passes per group: for each method stage, usually one pass (order statistics bracketed by a
sample read once per group, see `mcomp.merge.selection`; two more passes if a bracket
misses), then one merge pass that hands the merged delta to the sink. Statistics are exact,
so the result does not depend on the chunking.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from mcomp.merge import native
from mcomp.merge.acceleration import Acceleration, NonFiniteInput, instantiate
from mcomp.merge.kernels import Workspace, parallel_map, pool_threads, scratch
from mcomp.merge.registry import Chunk, MergeMethod, Segment, get_method, make_params
from mcomp.merge.selection import RowQuantiles
from mcomp.merge.sources import Source, TensorInfo
from mcomp.progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 20
DEVICE_CHUNK = 1 << 23
DEFAULT_SAMPLE = 1 << 20
SAMPLE_BLOCK = 2048


@dataclass
class MergeReport:
    """What a run did: full passes over the inputs (the most any group needed; the sample read
    for bracketing is not counted), time, and the per-group statistics."""

    method: str
    params: dict
    passes: int = 0
    seconds: float = 0.0
    groups: int = 0
    stats: list[dict] = field(default_factory=list)

    def card_facts(self) -> dict:
        """The figures a model card shows: the same on every run (the time is not)."""
        return {"method": self.method, "passes over the inputs": self.passes, "groups": self.groups}


class _Collect:
    """Stands in for an order-statistic reducer while the sample is observed."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        self.parts.append(x.to(torch.float32, copy=True))  # x may be a reused scratch buffer

    def values(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=1)


class _Ignore:
    def update(self, x: torch.Tensor) -> None:
        pass


class Sink:
    """Receives the output: copied (unmerged) tensors and merged slices, in layout order."""

    def copy(self, name: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def put(self, seg: Segment, base: torch.Tensor, delta: torch.Tensor) -> None:
        """`base`: float32 θ0 slice; `delta`: float32 merged task-vector slice (scale included)."""
        raise NotImplementedError


def _base_argument(method: MergeMethod, base: torch.Tensor) -> dict:
    """θ0 of the chunk as `observe`'s and `merge`'s keyword, for the methods that take it (`uses_base`)."""
    return {"base": base} if method.uses_base else {}


def _fmt_models(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


class MergeEngine:
    """Merge `models` onto `base` with `method` (a registered name, or a method class) and its parameters.

    `keys`: restrict merging to these tensors (others are copied from the base). `tensor_params`: per merged
    tensor, its own parameters (over `params`); each tensor is then a group of its own (mergekit's per-tensor
    parameters: gradients over the layers, filters).
    `device`: where the per-chunk maths runs ("cpu", "cuda", ...); reading and writing stay
    on the CPU. `pipeline`: read the next chunk on a thread (into pinned memory, sent to the device
    on a side stream) while the current one is computed; default on for a device other than the CPU.
    `chunk_elems`: coordinates per chunk (default 2^20, 2^23 on a device). `inmemory_elems`: groups up to this many
    coordinates are processed as one chunk. `sample_size`: coordinates sampled per group to
    bracket order statistics (0: use the two-pass histogram instead).
    """

    def __init__(
        self,
        base: Source,
        models: list[Source],
        method: str | type[MergeMethod],
        *,
        keys: list[str] | None = None,
        tensor_params: dict[str, dict[str, Any]] | None = None,
        device: str | torch.device = "cpu",
        chunk_elems: int | None = None,
        inmemory_elems: int = 0,
        sample_size: int = DEFAULT_SAMPLE,
        progress: bool = False,
        check_finite: bool = True,
        pipeline: bool | None = None,
        **params: Any,
    ):
        if not models:
            raise ValueError("need at least one model to merge")
        self.base = base
        self.models = models
        self.n = len(models)
        self.method_cls = method if isinstance(method, type) else get_method(method)
        self.tensor_params = None
        if tensor_params is None:
            self.params = make_params(self.method_cls, self.n, **params)
        else:
            self.tensor_params = {
                k: make_params(self.method_cls, self.n, **{**params, **v}) for k, v in tensor_params.items()
            }
            self.params = next(iter(self.tensor_params.values()))
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if chunk_elems is None:  # on a device: fewer, larger transfers and kernel launches
            chunk_elems = DEFAULT_CHUNK if self.device.type == "cpu" else DEVICE_CHUNK
        self.chunk_elems = max(int(chunk_elems), 1)
        # read chunk k+1 while chunk k is computed (on by default where the maths runs off the host)
        self.pipeline = self.device.type != "cpu" if pipeline is None else bool(pipeline)
        self.inmemory_elems = int(inmemory_elems)
        self.sample_size = int(sample_size)
        self.progress = progress
        self.check_finite = check_finite
        self.merge_keys, self.copy_keys = self._validate(keys)
        if self.tensor_params is not None:
            missing = [k for k in self.merge_keys if k not in self.tensor_params]
            if missing:
                raise ValueError(f"per-tensor parameters missing for {missing[:5]} ({len(missing)})")
            if any(self.method_cls(p, self.n).scope() == "global" for p in self.tensor_params.values()):
                raise ValueError("per-tensor parameters need the method's per-tensor scope (scope: tensor)")
        self.report = MergeReport(method=self.method_cls.name, params=self._params_dict())
        self._group_passes = 0
        self._stored_ok: bool | None = None
        self._second_workspace: Workspace | None = None  # the merge pass's, beside the method's

    def _params_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self.params)

    # -- validation ---------------------------------------------------------------------------
    def _validate(self, keys: list[str] | None) -> tuple[list[str], list[str]]:
        base_keys = set(self.base.infos)
        for m in self.models:
            mk = set(m.infos)
            if mk != base_keys:
                missing, extra = sorted(base_keys - mk), sorted(mk - base_keys)
                parts = []
                if missing:
                    parts.append(
                        f"missing from the model: {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})"
                    )
                if extra:
                    parts.append(f"not in the base: {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)})")
                raise ValueError(
                    f"model {m.name!r} and base {self.base.name!r} have different tensors: {'; '.join(parts)}"
                )
        order = self.base.storage_order() if hasattr(self.base, "storage_order") else list(self.base.infos)
        for key in order:
            b = self.base.infos[key]
            for m in self.models:
                info = m.infos[key]
                if info.shape != b.shape:
                    raise ValueError(
                        f"tensor {key!r}: shape {list(info.shape)} in model {m.name!r} "
                        f"but {list(b.shape)} in base {self.base.name!r}"
                    )
                if info.dtype != b.dtype:
                    raise ValueError(
                        f"tensor {key!r}: dtype {info.dtype} in model {m.name!r} "
                        f"but {b.dtype} in base {self.base.name!r}"
                    )
        if keys is not None:
            unknown = sorted(set(keys) - base_keys)
            if unknown:
                raise ValueError(f"tensors to merge not in base {self.base.name!r}: {unknown[:5]}")
        wanted = set(keys) if keys is not None else None
        merge = [k for k in order if self.base.infos[k].dtype.is_floating_point and (wanted is None or k in wanted)]
        copy = [k for k in order if k not in set(merge)]
        if not merge:
            raise ValueError("no floating-point tensors to merge")
        return merge, copy

    # -- planning -----------------------------------------------------------------------------
    def groups(self) -> list[list[str]]:
        method = self.method_cls(self.params, self.n)
        if self.tensor_params is None and method.scope() == "global":
            return [list(self.merge_keys)]
        return [[k] for k in self.merge_keys]

    def chunks(self, group: list[str]) -> list[Chunk]:
        infos = self.base.infos
        if self.method_cls.whole_tensors:
            return [Chunk((Segment(k, 0, infos[k].numel, tuple(infos[k].shape)),), i) for i, k in enumerate(group)]
        if self.method_cls.whole_slices:
            return self._slice_chunks(group)
        total = sum(infos[k].numel for k in group)
        if total <= self.inmemory_elems:
            return [Chunk(tuple(Segment(k, 0, infos[k].numel) for k in group), 0)]
        out: list[Chunk] = []
        for k in group:
            info = infos[k]
            numel = info.numel
            if numel <= self.chunk_elems:
                out.append(Chunk((Segment(k, 0, numel),), len(out)))
                continue
            row = numel // info.shape[0] if info.shape and info.shape[0] else numel
            step = max(self.chunk_elems // row, 1) * row if row <= self.chunk_elems else self.chunk_elems
            pieces = math.ceil(numel / step)
            step = math.ceil(numel / pieces / row) * row if row <= self.chunk_elems else math.ceil(numel / pieces)
            for start in range(0, numel, step):
                out.append(Chunk((Segment(k, start, min(start + step, numel)),), len(out)))
        return out

    def _slice_chunks(self, group: list[str]) -> list[Chunk]:
        """Chunks of whole dim-0 slices of one tensor (as many as fit in `chunk_elems`, at least one; a
        tensor of fewer than two dimensions whole), each segment with the shape of its slices."""
        out: list[Chunk] = []
        for k in group:
            info = self.base.infos[k]
            shape = tuple(info.shape)
            if len(shape) < 2 or info.numel == 0:
                out.append(Chunk((Segment(k, 0, info.numel, shape or (info.numel,)),), len(out)))
                continue
            row = info.numel // shape[0]
            rows = max(self.chunk_elems // row, 1)
            for first in range(0, shape[0], rows):
                last = min(first + rows, shape[0])
                out.append(Chunk((Segment(k, first * row, last * row, (last - first, *shape[1:])),), len(out)))
        return out

    def layout(self, out_dtype: torch.dtype | None = None) -> list[tuple[str, TensorInfo]]:
        """Output order: copied tensors first, then merged tensors group by group."""
        items = []
        for k in self.copy_keys:
            items.append((k, self.base.infos[k]))
        for group in self.groups():
            for k in group:
                info = self.base.infos[k]
                items.append((k, TensorInfo(info.shape, out_dtype or info.dtype)))
        return items

    # -- reading ------------------------------------------------------------------------------
    def read(
        self, chunk: Chunk, check: bool = False, workspace: Workspace | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ0, τ) of a chunk as float32 on the engine device: shapes (C,) and (n, C).

        With a `workspace` they live in its buffers (valid until the next read)."""
        base, tau = self.read_host(chunk, check, workspace if self.device.type == "cpu" else None)
        if self.device.type != "cpu":
            base, tau = base.to(self.device, non_blocking=True), tau.to(self.device, non_blocking=True)
        return base, tau

    def read_host(
        self, chunk: Chunk, check: bool = False, workspace: Workspace | None = None, pinned: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ0, τ) of a chunk as float32 on the CPU (in page-locked memory if `pinned`)."""
        size = chunk.size
        like = torch.empty(0, dtype=torch.float32)
        if pinned:
            base = torch.empty(size, dtype=torch.float32, pin_memory=True)
            tau = torch.empty(self.n, size, dtype=torch.float32, pin_memory=True)
        else:
            base = scratch(workspace, "read.base", (size,), like)
            tau = scratch(workspace, "read.tau", (self.n, size), like)
        pos = 0
        for seg in chunk.segments:
            end = pos + seg.size
            b = base[pos:end]
            b.copy_(self.base.view(seg.name, seg.start, seg.stop))
            for i, m in enumerate(self.models):
                delta = m.read_delta(seg.name, seg.start, seg.stop, b)
                if delta is not None:
                    tau[i, pos:end].copy_(delta)
                else:
                    torch.sub(m.view(seg.name, seg.start, seg.stop), b, out=tau[i, pos:end])
            pos = end
        if check:
            self._check_finite(chunk, base, tau)
        return base, tau

    def can_read_stored(self) -> bool:
        """Whether chunks can be handed to a method as stored values (plain checkpoints of a
        dtype the native kernels decode, maths on the CPU)."""
        if self._stored_ok is None:
            dtype = self.base.infos[self.merge_keys[0]].dtype
            self._stored_ok = (
                self.device.type == "cpu"
                and native.StoredColumns.supports(dtype)
                and all(self.base.infos[k].dtype == dtype for k in self.merge_keys)
                and self.base.stores_weights
                and all(m.stores_weights for m in self.models)
            )
        return self._stored_ok

    def read_stored(self, chunk: Chunk, workspace: Workspace | None = None) -> native.StoredColumns:
        """θ0 and θ_i of a chunk in their stored dtype: views of the sources for a chunk of one
        tensor (memory-mapped files: no copy), else copies in `workspace` buffers."""
        if len(chunk.segments) == 1:
            seg = chunk.segments[0]
            return native.StoredColumns(
                self.base.view(seg.name, seg.start, seg.stop),
                [m.view(seg.name, seg.start, seg.stop) for m in self.models],
                lasting=True,
            )
        size = chunk.size
        like = torch.empty(0, dtype=self.base.infos[chunk.segments[0].name].dtype)
        base = scratch(workspace, "read.stored_base", (size,), like)
        models = scratch(workspace, "read.stored_models", (self.n, size), like)
        pos = 0
        for seg in chunk.segments:
            end = pos + seg.size
            self.base.read_into(seg.name, seg.start, seg.stop, base[pos:end])
            for i, m in enumerate(self.models):
                m.read_into(seg.name, seg.start, seg.stop, models[i, pos:end])
            pos = end
        return native.StoredColumns(base, list(models))

    def method(self, workspace: Workspace | None = None, params: Any = None) -> MergeMethod:
        """An instance of the method to run (with `params`, default the merge's): its acceleration where one
        is available (given `workspace` for its scratch buffers), else the method itself."""
        method = instantiate(self.method_cls, params or self.params, self.n, workspace)
        if self.method_cls.takes_factors:
            method.low_rank_inputs = self.low_rank_inputs
        return method

    def low_rank_inputs(self, name: str) -> list | None:
        """Every model's task vector of 2-D tensor `name` as `LowRank` factors, or None unless all have them."""
        factors = [m.low_rank(name) for m in self.models]
        return None if any(f is None for f in factors) else factors

    def _read_for(self, method: MergeMethod, stage: int | None, chunk: Chunk, checked: list[bool]):
        """(float32 θ0 or None, the chunk for `method`): stored values when it takes them, else the
        float32 task vectors. A chunk is checked for NaN/Inf the first time it is read (by the
        method itself as it observes stored values, when it says it does)."""
        workspace = method.workspace if isinstance(method, Acceleration) else None
        if self.can_read_stored() and isinstance(method, Acceleration) and method.accepts_stored(stage):
            stored = self.read_stored(chunk, workspace)
            if not checked[chunk.index]:
                if not method.checks_finite(stage):
                    halves = [(0, chunk.size // 2), (chunk.size // 2, chunk.size)]  # both cores
                    if not all(parallel_map(lambda h: native.all_finite(stored.columns(*h)), halves)):
                        self.read(chunk, check=True)  # names the tensor and model(s) at fault
                checked[chunk.index] = True
            base = None
            if stage is None:  # the sink needs float32 θ0
                base = scratch(workspace, "read.base", (chunk.size,), torch.empty(0))
                base.copy_(stored.base)
            return base, stored
        base, tau = self.read(chunk, check=not checked[chunk.index], workspace=workspace)
        checked[chunk.index] = True
        return base, tau

    def _reads(self, method: MergeMethod, stage: int | None, chunks: list[Chunk], checked: list[bool]):
        """(chunk, θ0, τ) for each chunk in order, as `_read_for` gives them. Pipelined (`pipeline`,
        and the chunks are not handed over as stored values): chunk k+1 is read on a thread while
        chunk k is used; for a CUDA device into pinned memory and sent on a side stream, the compute
        stream waiting on its copy. Each chunk gets its own host buffers: a method may keep what it
        was given."""
        stored = self.can_read_stored() and isinstance(method, Acceleration) and method.accepts_stored(stage)
        if not self.pipeline or stored or len(chunks) < 2:
            for chunk in chunks:
                yield (chunk, *self._read_for(method, stage, chunk, checked))
            return
        cuda = self.device.type == "cuda"
        copy_stream = torch.cuda.Stream(self.device) if cuda else None

        def load(chunk: Chunk):
            base, tau = self.read_host(chunk, check=not checked[chunk.index], pinned=cuda)
            checked[chunk.index] = True
            if not cuda:
                return base, tau, None
            with torch.cuda.stream(copy_stream):
                moved = base.to(self.device, non_blocking=True), tau.to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(copy_stream)
            return (*moved, done)

        with ThreadPoolExecutor(1, thread_name_prefix="mcomp-read") as reader:
            pending = reader.submit(load, chunks[0])
            for k, chunk in enumerate(chunks):
                base, tau, done = pending.result()
                if k + 1 < len(chunks):
                    pending = reader.submit(load, chunks[k + 1])
                if done is not None:  # the compute stream waits for the copy; the allocator learns who uses it
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_event(done)
                    base.record_stream(compute)
                    tau.record_stream(compute)
                yield chunk, base, tau

    def _check_finite(self, chunk: Chunk, base: torch.Tensor, tau: torch.Tensor) -> None:
        # fast path: one reduction each; a NaN/Inf anywhere makes the sum non-finite (a finite
        # overflow only costs the exact check below)
        if math.isfinite(float(base.sum())) and math.isfinite(float(tau.sum())):
            return
        pos = 0
        for seg in chunk.segments:
            end = pos + seg.size
            if not bool(torch.isfinite(base[pos:end]).all()):
                raise ValueError(f"tensor {seg.name!r} of base {self.base.name!r} contains NaN or Inf")
            bad = [m.name for i, m in enumerate(self.models) if not bool(torch.isfinite(tau[i, pos:end]).all())]
            if bad:
                raise ValueError(
                    f"tensor {seg.name!r} contains NaN or Inf (or overflows against the base) in "
                    f"model(s) {_fmt_models(bad)}"
                )
            pos = end

    def read_sample(self, group: list[str], size: int) -> torch.Tensor:
        """τ at about `size` coordinates spread evenly over the group, in blocks: (n, m)."""
        infos = self.base.infos
        sizes = [infos[k].numel for k in group]
        total = sum(sizes)
        blocks = max(1, min(size, total) // SAMPLE_BLOCK)
        gen = torch.Generator().manual_seed(12345)
        offsets = (
            (
                (torch.arange(blocks, dtype=torch.float64) + torch.rand(blocks, generator=gen, dtype=torch.float64))
                * (total / blocks)
            )
            .long()
            .tolist()
        )
        cum = [0]
        for s in sizes:
            cum.append(cum[-1] + s)
        segs = []
        ti = 0
        for off in offsets:
            while off >= cum[ti + 1]:
                ti += 1
            local = off - cum[ti]
            start = max(0, min(local, sizes[ti] - SAMPLE_BLOCK))
            segs.append(Segment(group[ti], start, min(start + SAMPLE_BLOCK, sizes[ti])))
        _, tau = self.read(Chunk(tuple(segs)))
        return tau

    # -- running ------------------------------------------------------------------------------
    def _bar(self, total: int, desc: str):
        return progress_bar(total=total, desc=desc, unit="param", unit_scale=True, leave=False, enabled=self.progress)

    def group_stats(self, method: MergeMethod, group: list[str], chunks: list[Chunk], checked: list[bool]) -> dict:
        """Run the method's statistic stages over a group (passes over its chunks).

        Chunks are read into the workspace of an acceleration."""
        d = sum(self.base.infos[k].numel for k in group)
        stats: dict = {}
        sample = None
        for stage in range(method.num_stages()):
            reducers = method.reducers(stage, d)
            if not reducers:
                method.finish(stage, reducers, stats)
                continue
            quantiles = {k: r for k, r in reducers.items() if isinstance(r, RowQuantiles)}
            if quantiles and len(chunks) > 1 and self.sample_size > 0:
                if sample is None:
                    sample = self.read_sample(group, self.sample_size)
                view = {k: (_Collect() if k in quantiles else _Ignore()) for k in reducers}
                method.observe(stage, sample.clone(), Chunk(()), stats, view)
                for k, q in quantiles.items():
                    q.use_sample(view[k].values())
            first = True
            while first or any(q.needs_pass for q in quantiles.values()):
                # later passes only finish order statistics whose bracket missed
                view = reducers if first else {k: (r if k in quantiles else _Ignore()) for k, r in reducers.items()}
                for q in quantiles.values():
                    q.begin_pass()
                self._group_passes += 1
                with self._bar(d, f"{method.name} stage {stage + 1}") as bar:
                    self._observe_pass(method, stage, chunks, checked, stats, view, bar)
                for q in quantiles.values():
                    q.end_pass()
                first = False
            if any(q.passes > 1 for q in quantiles.values()):
                logger.info(
                    "%s stage %d: a sample bracket missed; exact histogram fallback used", method.name, stage + 1
                )
            method.finish(stage, reducers, stats)
        return stats

    def _observe_pass(
        self, method: MergeMethod, stage: int, chunks: list[Chunk], checked: list[bool], stats, view, bar
    ):
        """One statistics pass: every chunk observed, and an acceleration's deferred blocks waited for
        (also when an error unwinds the pass: none may outlive it)."""
        settle = method.settle if isinstance(method, Acceleration) else lambda: None
        try:
            for chunk, base, tau in self._reads(method, stage, chunks, checked):
                method.observe(stage, tau, chunk, stats, view, **_base_argument(method, base))
                bar.update(chunk.size)
            settle()
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                settle()
            if isinstance(exc, NonFiniteInput):
                self.read(exc.chunk, check=True)  # names the tensor and model(s) at fault
            raise

    def _merge_pass(
        self, method: MergeMethod, chunks: list[Chunk], checked: list[bool], stats: dict, sink: Sink, bar
    ) -> None:
        """The merge pass: each chunk's merged delta, then θ0 + delta to the sink. For an acceleration
        on the CPU the sink's part (the sum, the cast, the write) runs on a writer thread while the
        next chunk is merged: the chunks alternate between two workspaces, so the one the writer reads
        is not the one being filled, and the writer is at most one chunk behind."""

        def put(chunk: Chunk, base: torch.Tensor, delta: torch.Tensor) -> None:
            pos = 0
            for seg in chunk.segments:
                end = pos + seg.size
                sink.put(seg, base[pos:end], delta[pos:end])
                pos = end

        behind = isinstance(method, Acceleration) and method.workspace is not None and self.device.type == "cpu"
        if not behind or self.pipeline:
            for chunk, base, tau in self._reads(method, None, chunks, checked):
                put(chunk, base, self._merge_chunk(method, chunk, base, tau, stats))
                bar.update(chunk.size)
            return
        if self._second_workspace is None:  # kept for the next groups: its buffers are reused
            self._second_workspace = Workspace()
        spaces, pending = [method.workspace, self._second_workspace], None
        writer = ThreadPoolExecutor(1, thread_name_prefix="mcomp-write")
        try:
            for k, chunk in enumerate(chunks):
                method.workspace = spaces[k % 2]  # the writer may still read the other one
                base, tau = self._read_for(method, None, chunk, checked)
                delta = self._merge_chunk(method, chunk, base, tau, stats)
                if pending is not None:
                    pending.result()
                pending = writer.submit(put, chunk, base, delta)
                bar.update(chunk.size)
            if pending is not None:
                pending.result()
        finally:
            writer.shutdown(wait=True)  # nothing writes to the sink once this returns
            method.workspace = spaces[0]

    def _merge_chunk(self, method: MergeMethod, chunk: Chunk, base, tau, stats: dict) -> torch.Tensor:
        try:
            return method.merge(tau, chunk, stats, **_base_argument(method, base))
        except NonFiniteInput as exc:
            self.read(exc.chunk, check=True)  # names the tensor and model(s) at fault
            raise

    def run(self, sink: Sink) -> MergeReport:
        method = self.method(Workspace())
        if isinstance(method, Acceleration) and self.device.type == "cpu":
            with pool_threads():  # its maths on mcomp's pool, torch's small ops in between single-threaded
                return self._run(method, sink)
        return self._run(method, sink)

    def _run(self, method: MergeMethod, sink: Sink) -> MergeReport:
        t0 = time.perf_counter()
        for k in self.copy_keys:
            info = self.base.infos[k]
            sink.copy(k, self.base.read(k, 0, info.numel).reshape(info.shape))
        groups = self.groups()
        for group in groups:
            if self.tensor_params is not None:  # this tensor's own parameters
                workspace = method.workspace if isinstance(method, Acceleration) else None
                method = self.method(workspace, self.tensor_params[group[0]])
            chunks = self.chunks(group)
            checked = [not self.check_finite] * len(chunks)
            self._group_passes = 1  # the merge pass
            stats = self.group_stats(method, group, chunks, checked)
            self.report.stats.append(stats)
            logger.debug("%s: statistics %s", self.method_cls.name, stats)
            self.report.passes = max(self.report.passes, self._group_passes)
            with self._bar(sum(c.size for c in chunks), f"{method.name} merge") as bar:
                self._merge_pass(method, chunks, checked, stats, sink, bar)
        self.report.groups = len(groups)
        self.report.seconds = time.perf_counter() - t0
        logger.info(
            "%s merge: %d group(s), %d pass(es) over the inputs, %.1f s",
            self.method_cls.name,
            len(groups),
            self.report.passes,
            self.report.seconds,
        )
        return self.report
