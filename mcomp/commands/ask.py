"""`mcomp ask`: answer a question about media files with a saved (or a tiny built-in) model."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ask",
        help="answer a question about media files",
        description="Generate an answer (or score options) for a question about media files.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="directory of a saved mcomp model")
    src.add_argument("--tiny", action="store_true", help="a tiny randomly initialised image model built locally")
    p.add_argument(
        "--media",
        action="append",
        default=[],
        metavar="MODALITY=PATH",
        help="an input file, e.g. image=cat.png (repeatable; order is kept)",
    )
    p.add_argument("--options", help="comma-separated options to score by log-likelihood instead of generating")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length in tokens (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for --tiny")
    p.add_argument("question", help="the question; the media's placeholders are added for you")
    p.set_defaults(func=run)


def parse_media(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise ValueError(f"--media {item!r}: expected MODALITY=PATH, e.g. image=photo.png")
        out.append((key, path))
    return out


def build_question(model, question: str, media: list[tuple[str, str]]) -> str:
    """Prefix one `name: <tag>` line per input unless the question already holds placeholders."""
    tags = [model.adapters[model.modality_of(k)].placeholder for k, _ in media]
    if any(t in question for t in tags):
        return question
    lines = [f"{model.modality_of(k)}: {tag}" for (k, _), tag in zip(media, tags)]
    return "\n".join(lines + [question])


def run(args: argparse.Namespace) -> int:
    import torch

    import mcomp
    from mcomp.errors import MediaBatchError
    from mcomp.tiny import build_tiny_mllm

    torch.manual_seed(args.seed)
    model = build_tiny_mllm(seed=args.seed) if args.tiny else mcomp.load(args.model)
    media = parse_media(args.media)
    grouped: dict[str, list[str]] = {}
    for key, path in media:
        grouped.setdefault(key, []).append(path)
    prompt = model.template.prompt(build_question(model, args.question, media))
    try:
        return _answer(model, args, prompt, grouped)
    except MediaBatchError as err:  # one question: its file's own error reads better than the batch's
        raise next(iter(err.failures.values())) from None


def _answer(model, args: argparse.Namespace, prompt: str, grouped: dict[str, list[str]]) -> int:
    if args.options:
        options = [o.strip() for o in args.options.split(",") if o.strip()]
        scores = model.loglikelihood(prompt, [" " + o for o in options], grouped)
        best = max(range(len(options)), key=lambda i: scores[i].logprob)
        for option, s in zip(options, scores):
            print(f"{option}\tlogprob={s.logprob:.4f}\ttokens={s.num_tokens}")
        print(f"answer: {options[best]}")
    else:
        answer = model.generate([prompt], [grouped], max_new_tokens=args.max_new_tokens)[0]
        print(f"answer: {answer}")
    return 0
