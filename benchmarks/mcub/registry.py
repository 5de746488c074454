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

from mcomp.plugins import TASK_FUNCTIONS, Registry

ALLOW_CODE_HINT = "pass --allow-task-code to mcomp eval (allow_code=True in Python) to allow it"

KINDS = ("scorer", "options", "target")
# the entry points name modules that register their functions on import
_REGISTRY: dict[str, Registry[Callable]] = {
    kind: Registry(f"{kind} function", TASK_FUNCTIONS, register=lambda name, module: None) for kind in KINDS
}


def register(kind: str, name: str):
    if kind not in _REGISTRY:
        raise ValueError(f"unknown function kind {kind!r}; expected one of {KINDS}")

    def deco(fn: Callable) -> Callable:
        return _REGISTRY[kind].add(name, fn)

    return deco


def resolve(kind: str, name: str, source: str = "task", allow_code: bool = False) -> Callable:
    """A registered function by name, or "module:function".

    A module:function is imported only with `allow_code`; without it, it resolves only if it is a
    registered function already imported (a task resolves through `Task.resolve`, which passes its own
    `allow_code`).
    """
    if kind not in _REGISTRY:
        raise ValueError(f"unknown function kind {kind!r}; expected one of {KINDS}")
    functions = _REGISTRY[kind].all()
    if name in functions:
        return functions[name]
    if ":" not in name:
        raise ValueError(
            f"{source}: unknown {kind} function {name!r}; registered: {sorted(functions)} (or give 'module:function')"
        )
    module, _, attr = name.partition(":")
    known = getattr(sys.modules.get(module), attr, None)
    if known is not None and any(known is fn for fn in functions.values()):
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
    return sorted(_REGISTRY[kind].all())
