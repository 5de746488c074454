"""Accelerations: faster implementations of a registered merge method, kept apart from its maths.

A merge method (`mcomp.merge.registry`) is the rule alone: float32 task vectors in, statistics and
merged deltas out. An acceleration subclasses it and may add what only the engine should know
about: reusable scratch buffers (`workspace`), chunks handed over in their stored dtype
(`accepts_stored`, decoded by native kernels), the NaN/Inf check folded into its own pass
(`checks_finite`), fused kernels and column blocks on a thread pool. It must give the method's
results (to float rounding; tests/test_contracts.py compares every acceleration with its method).
The engine runs the acceleration of a method wherever one is registered and `available()`.

Accelerations register through the `mcomp.merge_accelerations` entry points, keyed by the name
of the method they accelerate.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from typing import ClassVar

from mcomp.merge.kernels import Workspace, wait_all
from mcomp.merge.registry import Chunk, MergeMethod, MethodParams
from mcomp.plugins import MERGE_ACCELERATIONS, Registry


class NonFiniteInput(ValueError):
    """Raised by an acceleration's `observe` or `settle` when the stored values it checks (see
    `checks_finite`) contain NaN or Inf in `chunk`; the engine then names the tensor and models at
    fault."""

    def __init__(self, chunk: Chunk):
        super().__init__(f"chunk {chunk.index} contains NaN or Inf")
        self.chunk = chunk


class Acceleration(MergeMethod):
    """Base of accelerations; subclass the accelerated method too: `class Fast(Acceleration, Slow)`."""

    accelerates: ClassVar[str]
    # chunks whose deferred blocks may still run while the engine reads the next (see `defer`)
    DEFERRED_CHUNKS: ClassVar[int] = 8

    def __init__(self, params: MethodParams, n: int, workspace: Workspace | None = None):
        super().__init__(params, n)
        # scratch buffers for the per-chunk maths; None (fresh tensors) when the caller keeps
        # what `merge`/`observe` return across chunks. What `merge` returns must be fresh or live
        # in it: the engine may swap in another workspace for the next chunk while a writer thread
        # still reads this chunk's result
        self.workspace = workspace
        self._deferred: deque[list[Future]] = deque()

    def defer(self, blocks: list[Future]) -> None:
        """Let a chunk's queued blocks (`mcomp.merge.kernels.queue_blocks`) run on after `observe`
        returns, so that the pool never waits for the engine between chunks; once more than
        DEFERRED_CHUNKS chunks are unfinished, wait for the oldest. Only for work whose inputs last
        (`StoredColumns.lasting`) and whose statistics take blocks in any order."""
        self._deferred.append(blocks)
        while len(self._deferred) > self.DEFERRED_CHUNKS:
            wait_all(self._deferred.popleft())

    def settle(self) -> None:
        """Wait for every deferred block (the engine calls this at the end of each statistics pass,
        and before it unwinds from an error); then raise the first error one of them raised."""
        blocks = [f for chunk in self._deferred for f in chunk]
        self._deferred.clear()
        wait_all(blocks)

    @classmethod
    def available(cls) -> bool:
        """Whether this acceleration can run here (e.g. its native library is built)."""
        return True

    def accepts_stored(self, stage: int | None) -> bool:
        """Whether `observe` for `stage` (`merge` for None) takes the chunk as stored values
        (`mcomp.merge.native.StoredColumns`) instead of a float32 task-vector matrix."""
        return False

    def checks_finite(self, stage: int | None) -> bool:
        """Whether `observe` for `stage` (`merge` for None, the merge pass), given stored values,
        itself checks that every task vector is finite as it goes (raising `NonFiniteInput`), so
        that the engine need not read each chunk once more to check it. Asked only of the first
        pass over a chunk."""
        return False


REGISTRY: Registry[type[Acceleration]] = Registry(
    "merge acceleration", MERGE_ACCELERATIONS, named=lambda cls: cls.accelerates
)


def register_acceleration(cls: type[Acceleration]) -> type[Acceleration]:
    return REGISTRY.add(cls.accelerates, cls)


def available_accelerations() -> dict[str, type[Acceleration]]:
    """The registered accelerations (those of the entry points included), by accelerated method."""
    return REGISTRY.all()


def acceleration_of(method: type[MergeMethod]) -> type[Acceleration] | None:
    """The registered acceleration of `method`, when it is available here (None otherwise)."""
    cls = available_accelerations().get(method.name)
    if cls is None or not issubclass(cls, method) or not cls.available():
        return None
    return cls


def instantiate(method: type[MergeMethod], params: MethodParams, n: int, workspace: Workspace | None = None):
    """The fastest available implementation of `method` for n models."""
    fast = acceleration_of(method)
    return fast(params, n, workspace) if fast is not None else method(params, n)
