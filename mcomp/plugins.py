"""Entry points: how built-in and third-party modality adapters, merge methods and task functions
reach their registries. Each registry loads its group lazily; a registry never imports the modules
that register into it, so no import cycle runs through a registry.

mcomp's own units are declared in its pyproject.toml exactly as a plug-in package declares its own:

    [project.entry-points."mcomp.modalities"]      name = "package.module:AdapterClass"
    [project.entry-points."mcomp.merge_methods"]   name = "package.module:MethodClass"
    [project.entry-points."mcomp.merge_accelerations"]  method name = "package.module:AccelerationClass"
    [project.entry-points."mcomp.world_renderers"]  modality = "package.module:render_function"
    [project.entry-points."mcomp.task_functions"]  name = "package.module"  (registers on import)
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

logger = logging.getLogger(__name__)

MODALITIES = "mcomp.modalities"
MERGE_METHODS = "mcomp.merge_methods"
MERGE_ACCELERATIONS = "mcomp.merge_accelerations"
WORLD_RENDERERS = "mcomp.world_renderers"
TASK_FUNCTIONS = "mcomp.task_functions"


T = TypeVar("T")


class Registry(Generic[T]):
    """The units of one concept by name: registered in code (a decorator calls `add`) or declared in
    the entry-point group `group`, which is loaded the first time the units are asked for. Unless its
    module registered it already, an entry point's object is registered under the entry point's
    name by `register(name, object)` (default: added as the unit, whose `named(unit)` must then be
    that name when `named` is given)."""

    def __init__(
        self,
        what: str,
        group: str,
        named: Callable[[T], str] | None = None,
        register: Callable[[str, Any], Any] | None = None,
    ):
        self.what = what
        self.group = group
        self._named = named
        self._register = register
        self._units: dict[str, T] = {}
        self._group_loaded = False

    def add(self, name: str, unit: T) -> T:
        other = self._units.get(name)
        if other is not None and other is not unit:
            where = f"{getattr(other, '__module__', '?')}.{getattr(other, '__qualname__', repr(other))}"
            raise ValueError(f"{self.what} {name!r} is already registered by {where}")
        self._units[name] = unit
        return unit

    def remove(self, name: str) -> None:
        self._units.pop(name, None)

    def all(self) -> dict[str, T]:
        """Every unit, the entry points' included, sorted by name."""
        if not self._group_loaded:
            self._group_loaded = True
            load_group(self.group, self._entry_point)
        return dict(sorted(self._units.items()))

    def get(self, name: str) -> T | None:
        return self.all().get(name)

    def _entry_point(self, name: str, unit: Any) -> None:
        if self._named is not None and self._named(unit) != name:
            raise ValueError(f"{self.what} entry point {name!r} names {self._named(unit)!r}")
        if name not in self._units:
            (self._register or self.add)(name, unit)


def load_group(group: str, loaded: Callable[[str, Any], None]) -> None:
    """Load every entry point of `group` and hand it to `loaded(name, object)`. mcomp's own entry
    points must load; a plug-in that fails is reported and skipped, so it cannot take mcomp down."""
    for ep in sorted(entry_points(group=group), key=lambda e: (not _ours(e), e.name)):
        try:
            obj = ep.load()
        except Exception as err:
            if _ours(ep):
                raise
            logger.warning("plug-in %r of %s (%s) failed to load: %s", ep.name, group, ep.value, err)
            continue
        loaded(ep.name, obj)


def _ours(ep) -> bool:
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.name == "mcomp"
