"""Scoring a multimodal LM the way lm-evaluation-harness asks a model: `generate` (until the
template's end) and `loglikelihood` of continuations after a context, one context or many at once
(`loglikelihood_batch`). `EvalModel` is that contract; `MultimodalLM` meets it through these
functions, and the evaluation harness asks for nothing else of a model."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from mcomp.batch import TEXT, Media, MultimodalInputs, select_cache
from mcomp.tokenization import tokenize_continuation


class LoglikelihoodRequest(NamedTuple):
    context: str
    continuations: list[str]
    media: Media | None = None


@dataclasses.dataclass
class LoglikelihoodResult:
    logprob: float  # sum of log-probabilities of the continuation tokens
    is_greedy: bool  # every continuation token is the argmax
    num_tokens: int


@runtime_checkable
class EvalModel(Protocol):
    """What the evaluation harness needs of a model (lm-evaluation-harness's shape)."""

    def generate(
        self, prompts: Sequence[str], media: Sequence[Media | None] | None = None, max_new_tokens: int = 128, **kwargs
    ) -> list[str]: ...

    def loglikelihood(
        self, context: str, continuations: Sequence[str], media: Media | None = None, **kwargs
    ) -> list[LoglikelihoodResult]: ...

    def loglikelihood_batch(
        self, requests: Sequence[LoglikelihoodRequest], batch_size: int = 16
    ) -> list[list[LoglikelihoodResult]]: ...


def stop_ids(model) -> list[int]:
    """Where generation ends: the tokenizer's EOS and the template's end-of-turn tokens."""
    ids = [model.tokenizer.eos_token_id] if model.tokenizer.eos_token_id is not None else []
    return ids + [t for t in getattr(model.template, "end_of_turn", []) if t not in ids]


@torch.no_grad()
def generate(
    model, prompts: Sequence[str], media: Sequence[Media | None] | None = None, max_new_tokens: int = 128, **kwargs
) -> list[str]:
    """Greedy (unless told otherwise) generation; returns the cleaned new text per prompt."""
    inputs = model.prepare_inputs(prompts, media)
    kwargs.setdefault("do_sample", False)
    model.routing.route_ids = model._route_ids(inputs.modality_ids)  # the prompt step only
    try:
        out = model.llm.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=model.tokenizer.pad_token_id,
            eos_token_id=stop_ids(model),
            **kwargs,
        )
    finally:
        model.routing.route_ids = None
    texts = model.tokenizer.batch_decode(out, skip_special_tokens=True)
    return [clean_generation(t, model.template.sep2) for t in texts]


@torch.no_grad()
def loglikelihood(
    model,
    context: str,
    continuations: Sequence[str],
    media: Media | None = None,
    *,
    reuse_context: bool = True,
    batch_size: int = 16,
) -> list[LoglikelihoodResult]:
    """Score each continuation after one context (the lm-eval `loglikelihood` request).

    The context (system text, media, question) is the same for every option and by far the
    longest part: by default it runs once with `use_cache=True`, and the options are scored in
    batches against copies of its keys/values (option tokens are text: they take the text
    route, as generated tokens do). `reuse_context=False` runs context + option as one full
    forward per option instead (same numbers up to rounding).
    """
    if reuse_context:
        return loglikelihood_batch(
            model, [LoglikelihoodRequest(context, list(continuations), media)], batch_size=batch_size
        )[0]
    cont_ids = continuation_ids(model, continuations)
    media_n = model._normalise_media([media], 1)
    ctx_ids = model.tokenize(context)
    model._check_placeholders(0, ctx_ids, media_n[0])
    return score_full(model, ctx_ids, model.encode_media(media_n), cont_ids)


def score_full(model, ctx_ids: list[int], features, cont_ids: list[list[int]]) -> list[LoglikelihoodResult]:
    """Every option by one full forward over context + option (no cache)."""
    inputs = model._assemble([ctx_ids + c for c in cont_ids], features * len(cont_ids), None, cont_ids)
    logits = model.forward(dataclasses.replace(inputs, labels=None)).logits.float()
    return score_continuations(logits, inputs)


@torch.no_grad()
def loglikelihood_batch(
    model,
    requests: Sequence[LoglikelihoodRequest],
    batch_size: int = 16,
) -> list[list[LoglikelihoodResult]]:
    """`loglikelihood` for several contexts at once: their media are encoded per modality as one
    batch, the contexts run as one left-padded forward, and every option of every context is
    scored against its own context's keys/values, `batch_size` options per forward. Small LLMs
    gain most (`scripts/bench_loglik.py`, 128 wide, 16 contexts: 1.5x on 2 CPU threads).
    Sample `i` of a MediaBatchError or PlaceholderMismatchError is request `i`."""
    requests = list(requests)
    cont_ids = [continuation_ids(model, r.continuations) for r in requests]
    media_n = model._normalise_media([r.media for r in requests], len(requests))
    ctx_ids = [model.tokenize(r.context) for r in requests]
    for i, (ids, media) in enumerate(zip(ctx_ids, media_n)):
        model._check_placeholders(i, ids, media)
    features = model.encode_media(media_n)
    ctx = model._assemble(ctx_ids, features)
    out = model.forward(ctx, use_cache=True, logits_to_keep=1)  # only the last position's logits
    if not hasattr(out.past_key_values, "batch_select_indices"):  # an LLM without a selectable cache
        return [score_full(model, ids, [f], options) for ids, f, options in zip(ctx_ids, features, cont_ids)]
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]: each option's first token
    rows = [(b, ids) for b, options in enumerate(cont_ids) for ids in options]
    scored: list[LoglikelihoodResult] = []
    for start in range(0, len(rows), max(1, batch_size)):
        scored += score_options(model, ctx, out.past_key_values, first, rows[start : start + batch_size])
    results, k = [], 0
    for options in cont_ids:
        results.append(scored[k : k + len(options)])
        k += len(options)
    return results


def continuation_ids(model, continuations: Sequence[str]) -> list[list[int]]:
    ids = [tokenize_continuation(model.tokenizer, c, model.text_encoder) for c in continuations]
    for c, t in zip(continuations, ids):
        if not t:
            raise ValueError(f"continuation {c!r} tokenises to nothing")
    return ids


def score_options(
    model, ctx: MultimodalInputs, cache, first: torch.Tensor, rows: list[tuple[int, list[int]]]
) -> list[LoglikelihoodResult]:
    """Options `rows` = (context index, option ids). An option's first token is read from its
    context's last logits; its other tokens come from one forward over the rows (right-padded)
    on a copy of the contexts' KV cache, each row on its context's keys/values."""
    device = ctx.inputs_embeds.device
    owner = torch.tensor([b for b, _ in rows], dtype=torch.long, device=device)
    logprobs = first.index_select(0, owner).unsqueeze(1)  # [n, 1, V]
    tails = [ids[:-1] for _, ids in rows]  # tokens that predict the option's later tokens
    width, n = max(len(t) for t in tails), len(rows)
    if width > 0:
        ids = torch.zeros(n, width, dtype=torch.long, device=device)
        tail_mask = torch.zeros(n, width, dtype=torch.long, device=device)
        for b, t in enumerate(tails):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
            tail_mask[b, : len(t)] = 1
        ctx_mask = ctx.attention_mask.index_select(0, owner)
        start = ctx_mask.sum(-1, keepdim=True)  # the contexts are left-padded: real length = next position
        step = MultimodalInputs(
            inputs_embeds=model.llm.get_input_embeddings()(ids),
            attention_mask=torch.cat([ctx_mask, tail_mask], dim=1),
            position_ids=start + torch.arange(width, device=device).unsqueeze(0),
            modality_ids=torch.full((n, width), TEXT, dtype=torch.long, device=device),
        )
        logits = model.forward(step, past_key_values=select_cache(cache, owner), use_cache=True).logits
        logprobs = torch.cat([logprobs, F.log_softmax(logits.float(), dim=-1)], dim=1)  # row k predicts token k
    results = []
    for b, (_, option_ids) in enumerate(rows):
        target = torch.tensor(option_ids, device=device)
        picked = logprobs[b, : len(option_ids)]
        lp = picked.gather(-1, target[:, None]).squeeze(-1)
        results.append(LoglikelihoodResult(float(lp.sum()), bool((picked.argmax(-1) == target).all()), len(option_ids)))
    return results


def score_continuations(logits: torch.Tensor, inputs: MultimodalInputs) -> list[LoglikelihoodResult]:
    """Sum of log p(continuation token | prefix); the continuation is the tail of each row."""
    logprobs = F.log_softmax(logits, dim=-1)
    results = []
    length = logits.shape[1]
    for b, ids in enumerate(inputs.continuation_ids):
        m = len(ids)
        target = torch.tensor(ids, device=logits.device)
        rows = logprobs[b, length - m - 1 : length - 1]  # position t predicts token t+1
        lp = rows.gather(-1, target[:, None]).squeeze(-1)
        greedy = bool((rows.argmax(-1) == target).all())
        results.append(LoglikelihoodResult(float(lp.sum()), greedy, m))
    return results


def clean_generation(text: str, stop: str = "</s>") -> str:
    """Strip, drop a trailing stop string, strip again (the published answer cleaning)."""
    text = text.strip()
    if stop and text.endswith(stop):
        text = text[: -len(stop)]
    return text.strip()
