"""Independent jobs on worker processes, for the zoo and the demo.

A tiny LLM, encoder or projector keeps two CPU threads only partly busy (measured on a 2-core
machine: a training step on 1 thread takes 1.4-1.6x its time on 2), so two single-threaded
processes, each on its own job, get more done than one process on both threads. Workers are
spawned (never forked: a forked copy of a process that has used OpenMP threads can hang), each
with `threads` torch threads; a job's result does not depend on which worker runs it or when.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import Any, Callable

from mcomp.progress import progress_bar, silence

logger = logging.getLogger(__name__)

Job = tuple[Callable[..., Any], tuple]  # a top-level function (picklable) and its arguments


def default_workers() -> int:
    """Two workers on two or more cores (one thread each on a 2-core machine), else one."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _start_worker(threads: int, log_level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    silence()  # the parent shows one bar over the jobs
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")


class JobPool:
    """Runs named jobs on `workers` processes (inline, in this process, when `workers` <= 1).

    Jobs are started in the order given (put the longest first). The first job to fail cancels
    the ones not yet started and its exception is raised here once the running ones end."""

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers if workers is not None else default_workers())
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> "JobPool":
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            import multiprocessing

            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(threads, logging.getLogger().getEffectiveLevel()),
            )
        return self._executor

    def run(self, jobs: dict[str, Job], desc: str) -> dict[str, Any]:
        """Each job's return value, by name."""
        results: dict[str, Any] = {}
        if not jobs:
            return results
        bar = progress_bar(total=len(jobs), desc=desc)
        try:
            if self.workers <= 1:
                for name, (fn, args) in jobs.items():
                    results[name] = fn(*args)
                    bar.update(1)
                return results
            pool = self._pool()
            pending = {pool.submit(fn, *args): name for name, (fn, args) in jobs.items()}
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    name = pending.pop(future)
                    if future.exception() is not None:
                        for other in pending:
                            other.cancel()
                        logger.error("job %s failed", name)
                        raise future.exception()
                    results[name] = future.result()
                    bar.update(1)
            return results
        finally:
            bar.close()
