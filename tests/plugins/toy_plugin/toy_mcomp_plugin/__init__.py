"""A toy modality defined outside mcomp: a text file of numbers, encoded by a frozen linear map."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mcomp import AdapterConfig, ModalityAdapter
from mcomp.errors import MediaError


@dataclasses.dataclass
class ToyConfig(AdapterConfig):
    adapter: str = "toy"
    tokens: int = 4
    dim: int = 8
    projector_type: str = "linear"


class ToyAdapter(ModalityAdapter):
    modality = "toy"
    placeholder = "<toy>"
    config_class = ToyConfig

    def build_encoder(self) -> nn.Module:
        return nn.Linear(1, self.config.dim)

    @property
    def encoder_dim(self) -> int:
        return self.config.dim

    @property
    def num_tokens(self) -> int:
        return self.config.tokens

    def load(self, path: str) -> list[float]:
        try:
            with open(path, encoding="utf-8") as f:
                values = [float(x) for x in f.read().split()]
        except (OSError, ValueError) as err:
            raise MediaError(path, f"not a list of numbers ({err})", self.modality) from None
        if len(values) != self.config.tokens:
            raise MediaError(path, f"expected {self.config.tokens} numbers, got {len(values)}", self.modality)
        return values

    def preprocess(self, raw) -> torch.Tensor:
        return torch.tensor(raw, dtype=torch.float32)[:, None]

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        return self.encoder(batch.to(self.encoder.weight.dtype))
