"""Named fault points: the fault-injection tests kill the process at a chosen point.

`MCOMP_FAULT=name` (or `name@N`, the N-th time the point is reached; several comma-separated)
makes `point(name)` end the process with SIGKILL, as a power cut or the OOM killer would. Unset,
a point costs a dictionary look-up.
"""

from __future__ import annotations

import os
import signal

ENV = "MCOMP_FAULT"
_hits: dict[str, int] = {}


def _wanted() -> dict[str, int]:
    out = {}
    for item in os.environ.get(ENV, "").split(","):
        name, _, count = item.strip().partition("@")
        if name:
            out[name] = int(count or 1)
    return out


def point(name: str) -> None:
    """Kill this process here if the environment asks for it."""
    if ENV not in os.environ:
        return
    wanted = _wanted().get(name)
    if wanted is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == wanted:
        os.kill(os.getpid(), signal.SIGKILL)
