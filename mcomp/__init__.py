"""mcomp: compose single-modality multimodal LLMs that share a base LLM into one MLLM."""
from __future__ import annotations

import logging

from mcomp.version import __version__  # noqa: E402,F401

logging.getLogger(__name__).addHandler(logging.NullHandler())

from mcomp.modality import (  # noqa: E402
    AdapterConfig,
    ModalityAdapter,
    available_adapters,
    build_adapter,
    register_modality,
)
from mcomp.model import MultimodalLM  # noqa: E402


def load(path, **kwargs) -> MultimodalLM:
    """Load a multimodal model saved by mcomp (`MultimodalLM.save_pretrained`)."""
    return MultimodalLM.from_pretrained(path, **kwargs)


__all__ = [
    "AdapterConfig", "ModalityAdapter", "MultimodalLM", "available_adapters", "build_adapter", "load",
    "register_modality", "__version__",
]
