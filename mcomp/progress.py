"""mcomp's progress bars: tqdm, switched off for a whole process by `silence()` (the worker
processes of `mcomp.jobs`, whose parent shows one bar over the jobs instead).

A process-wide switch here, not TQDM_DISABLE: tqdm reads its environment once, when it is first
imported, and importing mcomp (torch, transformers) has imported it before a worker can set it.
"""

from __future__ import annotations

from tqdm.auto import tqdm

_silenced = False


def silence() -> None:
    global _silenced
    _silenced = True


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar; `enabled=False` (or a silenced process) gives a disabled one. Otherwise `disable`
    is left to tqdm's default, so a user's TQDM_DISABLE still applies."""
    if _silenced or not enabled:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
