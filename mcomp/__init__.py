"""mcomp: compose single-modality multimodal LLMs that share a base LLM into one MLLM."""

from __future__ import annotations

import importlib
import logging

from mcomp.version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

# The package's names load on first use, so that `import mcomp.<module>` of a light module (the
# modality table, the version, the configs) does not import torch.
_EXPORTS = {
    "AdapterConfig": "mcomp.modality",
    "ModalityAdapter": "mcomp.modality",
    "available_adapters": "mcomp.modality",
    "build_adapter": "mcomp.modality",
    "register_modality": "mcomp.modality",
    "MultimodalLM": "mcomp.model",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mcomp' has no attribute {name!r}")


def load(path, **kwargs):
    """Load a multimodal model saved by mcomp (`MultimodalLM.save_pretrained`)."""
    from mcomp.model import MultimodalLM

    return MultimodalLM.from_pretrained(path, **kwargs)


__all__ = [*_EXPORTS, "load", "__version__"]
