"""Entry points: how built-in and third-party modality adapters, merge methods and task functions
reach their registries. Each registry loads its group lazily; a registry never imports the modules
that register into it, so no import cycle runs through a registry.

mcomp's own units are declared in its pyproject.toml exactly as a plug-in package declares its own:

    [project.entry-points."mcomp.modalities"]      name = "package.module:AdapterClass"
    [project.entry-points."mcomp.merge_methods"]   name = "package.module:MethodClass"
    [project.entry-points."mcomp.task_functions"]  name = "package.module"  (registers on import)
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any, Callable

logger = logging.getLogger(__name__)

MODALITIES = "mcomp.modalities"
MERGE_METHODS = "mcomp.merge_methods"
TASK_FUNCTIONS = "mcomp.task_functions"


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
