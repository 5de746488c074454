"""Projectors from encoder features to the LLM width, named as in the published configs."""

from __future__ import annotations

import re

from torch import nn


def build_projector(projector_type: str, in_dim: int, out_dim: int) -> nn.Module:
    """`linear`, or `mlpNx_gelu` (N Linear layers with exact GELU between them).

    `mlp2x_gelu` is Sequential(Linear, GELU, Linear): state-dict keys `0.*` and `2.*`, as released.
    """
    if projector_type == "linear":
        return nn.Linear(in_dim, out_dim)
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match:
        depth = int(match.group(1))
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projector_type {projector_type!r} (expected 'linear' or 'mlp<N>x_gelu')")
