"""Option scoring for the harness: `MultimodalLM.loglikelihood` runs the shared context once and
scores the options against its KV cache (`score_options_batch`: several contexts as one batch);
`score_options_full` is the no-reuse baseline (one full forward per option) that
`scripts/bench_loglik.py` compares it with."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from mcomp.scoring import LoglikelihoodRequest, LoglikelihoodResult


@torch.no_grad()
def score_options(
    model, context: str, continuations: Sequence[str], media: Mapping[str, Any] | None = None, batch_size: int = 16
) -> list[LoglikelihoodResult]:
    """Log-likelihood of each continuation after `context` (with `media`), the context run once."""
    return model.loglikelihood(context, list(continuations), media, reuse_context=True, batch_size=batch_size)


@torch.no_grad()
def score_options_batch(
    model, requests: Sequence[tuple[str, Sequence[str], Mapping[str, Any] | None]], batch_size: int = 16
) -> list[list[LoglikelihoodResult]]:
    """`score_options` for several (context, continuations, media) requests, the contexts run as one
    left-padded batch."""
    return model.loglikelihood_batch(
        [LoglikelihoodRequest(c, list(o), m) for c, o, m in requests], batch_size=batch_size
    )


@torch.no_grad()
def score_options_full(
    model, context: str, continuations: Sequence[str], media: Mapping[str, Any] | None = None
) -> list[LoglikelihoodResult]:
    """Baseline: every option scored by its own forward pass over context + option (no reuse)."""
    return [model.loglikelihood(context, [c], media, reuse_context=False)[0] for c in continuations]
