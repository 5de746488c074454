"""Named functions that task YAML files refer to: scorers, option builders and target extractors.

A task adds its own by registering it (in a module listed under `functions:` in the task YAML),
or refers to one directly as "package.module:function". Task files are data: a task file may import
modules and module:function callables only when the user allows it (`mcomp eval --allow-task-code`,
`load_task(..., allow_code=True)`); registered functions are usable by name without it.

    from mcomp.benchmarks.mcub.registry import register
    @register("scorer", "my_match")
    def my_match(response: str, target: str) -> tuple[str, bool]: ...
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from mcomp.plugins import TASK_FUNCTIONS, load_group

ALLOW_CODE_HINT = "pass --allow-task-code to mcomp eval (allow_code=True in Python) to allow it"

KINDS = ("scorer", "options", "target")
_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str):
    if kind not in _REGISTRY:
        raise ValueError(f"unknown function kind {kind!r}; expected one of {KINDS}")

    def deco(fn: Callable) -> Callable:
        other = _REGISTRY[kind].get(name)
        if other is not None and other is not fn:
            raise ValueError(
                f"{kind} function {name!r} is already registered by {other.__module__}.{other.__qualname__}"
            )
        _REGISTRY[kind][name] = fn
        return fn

    return deco


_LOADED = False


def _load_entry_points() -> None:
    """Import the modules of the `mcomp.task_functions` entry points (mcomp's built-ins among them):
    they register their functions on import."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        load_group(TASK_FUNCTIONS, lambda name, module: None)


def resolve(kind: str, name: str, source: str = "task", allow_code: bool = False) -> Callable:
    """A registered function by name, or "module:function".

    A module:function is imported only with `allow_code`; without it, it resolves only if it is a
    registered function already imported (a task resolves through `Task.resolve`, which passes its own
    `allow_code`).
    """
    _load_entry_points()
    if kind not in _REGISTRY:
        raise ValueError(f"unknown function kind {kind!r}; expected one of {KINDS}")
    if name in _REGISTRY[kind]:
        return _REGISTRY[kind][name]
    if ":" not in name:
        raise ValueError(
            f"{source}: unknown {kind} function {name!r}; registered: {sorted(_REGISTRY[kind])} "
            f"(or give 'module:function')"
        )
    module, _, attr = name.partition(":")
    known = getattr(sys.modules.get(module), attr, None)
    if known is not None and any(known is fn for fn in _REGISTRY[kind].values()):
        return known  # a registered function by its full path: nothing is imported
    if not allow_code:
        raise ValueError(
            f"{source}: {kind} {name!r} is Python code (module:function); a task file is data and "
            f"cannot import code unless allowed: {ALLOW_CODE_HINT}"
        )
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{source}: cannot import {kind} function {name!r}: {err}") from None
    if not callable(fn):
        raise ValueError(f"{source}: {kind} function {name!r} is not callable")
    return fn


def registered(kind: str) -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY[kind])
