"""Named functions that task YAML files refer to: scorers, option builders and target extractors.

A task adds its own by registering it (in a module listed under `functions:` in the task YAML),
or refers to one directly as "package.module:function".

    from mcomp.benchmarks.mcub.registry import register
    @register("scorer", "my_match")
    def my_match(response: str, target: str) -> tuple[str, bool]: ...
"""
from __future__ import annotations

import importlib
from typing import Callable

KINDS = ("scorer", "options", "target")
_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str):
    if kind not in _REGISTRY:
        raise ValueError(f"unknown function kind {kind!r}; expected one of {KINDS}")

    def deco(fn: Callable) -> Callable:
        other = _REGISTRY[kind].get(name)
        if other is not None and other is not fn:
            raise ValueError(f"{kind} function {name!r} is already registered by {other.__module__}.{other.__qualname__}")
        _REGISTRY[kind][name] = fn
        return fn

    return deco


def resolve(kind: str, name: str, source: str = "task") -> Callable:
    """A registered function by name, or "module:function"."""
    import mcomp.benchmarks.mcub.scoring  # noqa: F401  (built-ins register on import)

    if kind not in _REGISTRY:
        raise ValueError(f"unknown function kind {kind!r}; expected one of {KINDS}")
    if name in _REGISTRY[kind]:
        return _REGISTRY[kind][name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{source}: cannot import {kind} function {name!r}: {err}") from None
        if not callable(fn):
            raise ValueError(f"{source}: {kind} function {name!r} is not callable")
        return fn
    raise ValueError(f"{source}: unknown {kind} function {name!r}; registered: {sorted(_REGISTRY[kind])} "
                     f"(or give 'module:function')")


def registered(kind: str) -> list[str]:
    import mcomp.benchmarks.mcub.scoring  # noqa: F401

    return sorted(_REGISTRY[kind])
