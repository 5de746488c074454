"""Jobs on worker processes: results by name, failures raised here, workers without progress bars."""

from __future__ import annotations

import pytest

from mcomp.jobs import JobPool
from mcomp.progress import progress_bar


def bar_is_disabled(_: int) -> bool:
    return bool(progress_bar(total=1).disable)


def square_or_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative input {x}")
    return x * x


def test_results_by_name_on_workers_and_inline():
    jobs = {f"j{x}": (square_or_fail, (x,)) for x in range(5)}
    with JobPool(2) as pool:
        assert pool.run(jobs, "squares") == {f"j{x}": x * x for x in range(5)}
    with JobPool(1) as pool:
        assert pool.run(jobs, "squares") == {f"j{x}": x * x for x in range(5)}


def test_a_failing_job_raises_here():
    with JobPool(2) as pool, pytest.raises(ValueError, match="negative input -3"):
        pool.run({"ok": (square_or_fail, (2,)), "bad": (square_or_fail, (-3,))}, "squares")


def test_workers_show_no_progress_bars(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with JobPool(2) as pool:
        assert pool.run({"a": (bar_is_disabled, (0,))}, "bars") == {"a": True}  # the parent shows one bar
    assert progress_bar(total=1).disable is False  # this process is not silenced
