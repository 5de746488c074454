"""The modality adapter abstraction and its registry.

A modality adapter turns media files into LLM input embeddings:

    path --load--> raw media --preprocess--> tensor --(stack)--> encode (frozen) --> project --> [B, n, hidden]

Each adapter type is registered under a name (``@register_modality``). Packages, mcomp itself
included, declare theirs in the ``mcomp.modalities`` entry-point group, pointing at the class
(`mcomp.plugins`):

    [project.entry-points."mcomp.modalities"]
    toy = "my_package.toy:ToyAdapter"
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from mcomp.configuration import JsonConfig
from mcomp.errors import MediaBatchError, MediaError
from mcomp.plugins import MODALITIES, Registry

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = MODALITIES


@dataclasses.dataclass
class AdapterConfig(JsonConfig):
    """Fields every adapter config has. Subclasses add encoder/projector fields."""

    adapter: str = ""  # registry name of the adapter type; filled in by the registry
    projector_type: str = "mlp2x_gelu"


class ModalityAdapter(nn.Module):
    """Encoder (frozen) + projector (trainable) + media loading for one modality.

    Subclasses set the class attributes and implement `load`, `preprocess`, `build_encoder`,
    `encode` and `encoder_dim`; the rest (batching, error collection, projection) is shared.
    """

    modality: ClassVar[str]  # what the input is: "image", "audio", ...
    placeholder: ClassVar[str]  # literal tag in prompts, e.g. "<image>"
    aliases: ClassVar[tuple[str, ...]] = ()  # other keys for `modal_inputs` (e.g. "vision")
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig

    def __init__(self, config: AdapterConfig, llm_hidden_size: int):
        super().__init__()
        self.config = config
        self.llm_hidden_size = llm_hidden_size
        self.encoder = self.build_encoder()
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.projector = self.build_projector()

    # --- to implement -------------------------------------------------------------------
    def build_encoder(self) -> nn.Module:
        raise NotImplementedError

    def build_projector(self) -> nn.Module:
        """Trainable map from encoder features to the LLM width (override for e.g. a Q-Former)."""
        from mcomp.encoders.projector import build_projector

        return build_projector(self.config.projector_type, self.encoder_dim, self.llm_hidden_size)

    @property
    def encoder_dim(self) -> int:
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        """Tokens one input occupies in the LLM sequence."""
        raise NotImplementedError

    def tokens_for(self, features: torch.Tensor) -> int:
        """Tokens the input with these encoder features occupies (`num_tokens`, unless it varies by input)."""
        return self.num_tokens

    def load(self, path: str) -> Any:
        """Decode a media file from disk; raise MediaError naming the file on failure."""
        raise NotImplementedError

    def preprocess(self, raw: Any) -> torch.Tensor:
        """Turn decoded media into the encoder's input tensor for one sample."""
        raise NotImplementedError

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """Frozen encoder features [B, n, encoder_dim]."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm/dropout stay in inference mode
        return self

    def input_tensor(self, source: Any) -> torch.Tensor:
        """One sample: a path is decoded from disk; anything else is taken as decoded media.

        Whatever `load` or `preprocess` raises (a decoder's own exception, a decompression bomb, a bug
        in a plug-in adapter) becomes a MediaError naming the file, so one bad file fails its own
        sample only. MemoryError and what is not an Exception (KeyboardInterrupt, SystemExit) propagate.
        """
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            with self._as_media_error(path, "cannot decode"):
                raw = self.load(path)
            with self._as_media_error(path, "preprocessing failed"):
                return self.preprocess(raw)
        if isinstance(source, torch.Tensor) and source.dim() > 0 and self._is_preprocessed(source):
            return source
        with self._as_media_error(None, "preprocessing failed"):
            return self.preprocess(source)

    @contextlib.contextmanager
    def _as_media_error(self, path: str | None, what: str):
        try:
            yield
        except MemoryError:  # the machine's state, not the file's: not a per-sample error
            raise
        except MediaError as err:
            if err.path is None and path is not None:  # preprocess does not know the file: name it
                raise MediaError(path, err.reason, err.modality or self.modality) from err
            raise
        except Exception as err:
            logger.debug("%s input %s: %s", self.modality, path, what, exc_info=True)
            raise MediaError(path, f"{what} ({type(err).__name__}: {err})", self.modality) from err

    def _is_preprocessed(self, tensor: torch.Tensor) -> bool:
        return False

    def input_tensors(self, sources: Sequence[Any]) -> list[torch.Tensor]:
        """Decode and preprocess every source; report all failures at once, by sample index."""
        tensors, failures = [], {}
        for i, src in enumerate(sources):
            try:
                tensors.append(self.input_tensor(src))
            except MediaError as err:
                failures[i] = err
        if failures:
            raise MediaBatchError(failures)
        return tensors

    def prepare(self, sources: Sequence[Any]) -> torch.Tensor:
        """The encoder's input batch of `sources` (of one shape: a still image given to the video
        adapter is one frame, a video `num_frames`; `encode_tensors` batches by shape)."""
        return self.collate(self.input_tensors(sources))

    def encode_tensors(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder features of each input tensor; tensors of one shape run as one batch."""
        with torch.no_grad():
            return by_shape(tensors, lambda group: self.encode(self.collate(group).to(self.device)))

    def project_features(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`project` over per-input features of possibly different lengths (batched by shape)."""
        return by_shape(features, lambda group: self.project(torch.stack(group)))

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Encoder input batch -> projected features [B, num_tokens, llm_hidden_size]."""
        with torch.no_grad():
            feats = self.encode(batch.to(self.device))
        return self.project(feats)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(features.to(proj_dtype))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fingerprint(self) -> str:
        """Identifies the encoder (config + weights), so cached features can be reused safely.

        Computed once: the encoder is frozen (call `forget_fingerprint` after replacing its weights).
        """
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def forget_fingerprint(self) -> None:
        self._fingerprint = None

    def _compute_fingerprint(self) -> str:
        from mcomp.fingerprint import fingerprint, tensors_sha256

        return fingerprint({"config": self.config.to_dict(), "encoder": tensors_sha256(self.encoder.state_dict())})[:16]


def by_shape(items: Sequence[torch.Tensor], run: Callable[[list[torch.Tensor]], torch.Tensor]) -> list[torch.Tensor]:
    """`run` over the items grouped by shape (one call per shape, on the group in order), and its
    output rows handed back in the items' order."""
    groups: dict[tuple, list[int]] = {}
    for k, t in enumerate(items):
        groups.setdefault(tuple(t.shape), []).append(k)
    out: list[torch.Tensor | None] = [None] * len(items)
    for members in groups.values():
        for k, row in zip(members, run([items[k] for k in members])):
            out[k] = row
    return out


REGISTRY: Registry[type[ModalityAdapter]] = Registry(
    "modality adapter", ENTRY_POINT_GROUP, register=lambda name, cls: register_modality(name)(cls)
)


def register_modality(name: str):
    """Class decorator: make an adapter type available by name (e.g. in configs and the CLI)."""

    def deco(cls: type[ModalityAdapter]) -> type[ModalityAdapter]:
        if not (isinstance(cls, type) and issubclass(cls, ModalityAdapter)):
            raise TypeError(f"@register_modality({name!r}) needs a ModalityAdapter subclass, got {cls!r}")
        for attr in ("modality", "placeholder"):
            if not isinstance(getattr(cls, attr, None), str):
                raise TypeError(f"{cls.__name__} must set the class attribute {attr!r}")
        REGISTRY.add(name, cls)
        cls.adapter_name = name
        return cls

    return deco


def available_adapters() -> dict[str, type[ModalityAdapter]]:
    """All adapter types: built-in, decorated, and from installed plug-ins."""
    return REGISTRY.all()


def get_adapter_class(name: str) -> type[ModalityAdapter]:
    adapters = available_adapters()
    if name not in adapters:
        raise KeyError(f"unknown modality adapter {name!r}; available: {sorted(adapters)}")
    return adapters[name]


def build_adapter(config: AdapterConfig | dict[str, Any], llm_hidden_size: int) -> ModalityAdapter:
    """Build an adapter from its config (an AdapterConfig or its dict with an `adapter` field)."""
    if isinstance(config, dict):
        if "adapter" not in config:
            raise ValueError(f"adapter config has no 'adapter' field (the adapter type name): {config}")
        cls = get_adapter_class(config["adapter"])
        config = cls.config_class.from_dict(config, source=f"{config['adapter']} adapter config")
    else:
        cls = get_adapter_class(config.adapter)
    return cls(config, llm_hidden_size)
