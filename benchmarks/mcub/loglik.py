"""Option scoring by log-likelihood with the shared context computed once.

The question (system text, media features, question, "ASSISTANT:") is the same for every option, and
it is by far the longest part of the input. `score_options` runs it once with `use_cache=True`, then
scores all options (in batches) against copies of the cached keys/values: the first token of every
option is read from the context's last logits, the remaining tokens are one forward pass over the
option batch (right-padded, so padding never precedes a real token). Option tokens are text, so they
take the text route (spec section 3.5), as the continuation tokens of `MultimodalLM.loglikelihood` do.
The result equals `MultimodalLM.loglikelihood` up to floating-point rounding.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from mcomp.model import TEXT, LoglikelihoodResult, MultimodalInputs
from mcomp.tokenization import tokenize_continuation


def _expand_cache(cache, repeats: int):
    """A copy of `cache` with its batch of one repeated `repeats` times; `cache` itself is left unchanged."""
    if hasattr(cache, "layers"):  # transformers Cache objects: layers reassign their tensors when repeating
        new = copy.copy(cache)
        new.layers = [copy.copy(layer) for layer in cache.layers]
        new.batch_repeat_interleave(repeats)
        return new
    new = copy.deepcopy(cache)  # other cache types: a full copy, then repeated in place
    new.batch_repeat_interleave(repeats)
    return new


@torch.no_grad()
def score_options(
    model,
    context: str,
    continuations: Sequence[str],
    media: Mapping[str, Any] | None = None,
    batch_size: int = 16,
) -> list[LoglikelihoodResult]:
    """Log-likelihood of each continuation after `context` (with `media`), the context run once."""
    cont_ids = [tokenize_continuation(model.tokenizer, c) for c in continuations]
    for c, ids in zip(continuations, cont_ids):
        if not ids:
            raise ValueError(f"continuation {c!r} tokenises to nothing")
    ctx = model.prepare_inputs([context], [media])
    out = model.forward(ctx, use_cache=True)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts every option's first token
    cache = out.past_key_values
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):  # no reusable KV cache: full passes
        return model.loglikelihood(context, list(continuations), media)
    ctx_len = ctx.inputs_embeds.shape[1]
    embed = model.llm.get_input_embeddings()
    device = ctx.inputs_embeds.device
    results: list[LoglikelihoodResult] = []
    for start in range(0, len(cont_ids), max(1, batch_size)):
        chunk = cont_ids[start : start + batch_size]
        tails = [ids[:-1] for ids in chunk]  # tokens that predict the option's later tokens
        width = max(len(t) for t in tails)
        n = len(chunk)
        logprobs = first.expand(n, 1, first.shape[-1])  # [n, 1, vocab]
        if width > 0:
            ids = torch.zeros(n, width, dtype=torch.long, device=device)
            mask = torch.zeros(n, ctx_len + width, dtype=torch.long, device=device)
            mask[:, :ctx_len] = 1
            for b, t in enumerate(tails):
                ids[b, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
                mask[b, ctx_len : ctx_len + len(t)] = 1
            positions = torch.arange(ctx_len, ctx_len + width, device=device).unsqueeze(0).expand(n, -1)
            step = MultimodalInputs(
                inputs_embeds=embed(ids), attention_mask=mask, position_ids=positions,
                modality_ids=torch.full((n, width), TEXT, dtype=torch.long, device=device),
            )
            logits = model.forward(step, past_key_values=_expand_cache(cache, n), use_cache=True).logits
            logprobs = torch.cat([logprobs, F.log_softmax(logits.float(), dim=-1)], dim=1)  # row k predicts token k
        for b, option_ids in enumerate(chunk):
            target = torch.tensor(option_ids, device=device)
            rows_b = logprobs[b, : len(option_ids)]
            lp = rows_b.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((rows_b.argmax(-1) == target).all())
            results.append(LoglikelihoodResult(float(lp.sum()), greedy, len(option_ids)))
    return results


@torch.no_grad()
def score_options_full(
    model, context: str, continuations: Sequence[str], media: Mapping[str, Any] | None = None
) -> list[LoglikelihoodResult]:
    """Baseline: every option scored by its own forward pass over context + option (no reuse)."""
    return [model.loglikelihood(context, [c], media)[0] for c in continuations]
