"""`mcomp compose`: NaiveMC or DAMC composition of single-modality MLLMs into one model."""

from __future__ import annotations

import argparse
import logging

from mcomp.configuration import parse_pairs
from mcomp.merge.registry import available_methods
from mcomp.output_record import OutputRecord, add_from_option

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compose",
        help="compose single-modality MLLMs that share a base LLM (NaiveMC, DAMC)",
        description="Reuse every model's encoder and projector and merge their LLM (LoRA) parameters. "
        "NaiveMC merges everything; DAMC merges only the text adapters and routes each "
        "modality's tokens through that model's own modality adapter.",
    )
    p.add_argument("--modalities", help="comma-separated modalities to compose (default: the keys of --models)")
    p.add_argument(
        "--models",
        help="MODALITY=DIR,... model directories, one per modality (a model of several, e.g. an imported "
        "LLaVA-OneVision, may be named for each) "
        "(default: the tiny zoo's models for --modalities, built locally if needed)",
    )
    p.add_argument("--zoo-size", default="full", help="without --models: which zoo (full or test)")
    p.add_argument(
        "--method",
        choices=("naivemc", "damc"),
        default="naivemc",
        help="naivemc: merge the models' LLM parameters; damc: merge only their text parameters, each "
        "modality keeps its own (needs models trained with --decoupled, or --convert) (default naivemc)",
    )
    p.add_argument(
        "--merge",
        default="linear",
        help=f"merge backend for the text parameters: {', '.join(available_methods())} (dare = dare_ties)",
    )
    p.add_argument("--weights", help="MODALITY=λ,... per-model coefficients (default: 1/n each)")
    p.add_argument(
        "--merge-params",
        default="",
        help="NAME=VALUE,... merge-engine parameters, e.g. density=0.2 or ratio=0.1,clip=0.01,inter=v1",
    )
    p.add_argument(
        "--merge-space",
        choices=("delta", "factors"),
        default="delta",
        help="what the text adapters' merge acts on: delta (dW = s B A, exact for linear) or factors "
        "(A and B apart, as the released merge script's ties-mean / sum / mean strategies)",
    )
    p.add_argument(
        "--convert",
        action="store_true",
        help="DAMC from non-decoupled models: each model's one LoRA serves its modality and text tokens",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        help="non-linear merges: re-factorise the merged text delta to this LoRA rank by SVD "
        "(DAMC default: sum of input ranks; NaiveMC default: fold into the base weights)",
    )
    p.add_argument("--search-weights", action="store_true", help="search the per-model weights on --dev data")
    p.add_argument("--dev", help="dev conversations JSON for --search-weights (never the test split)")
    p.add_argument("--dev-root", help="media folder for --dev (default: its folder)")
    p.add_argument("--budget", type=int, default=30, help="objective evaluations for --search-weights")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every random step: DARE's drop masks (unless --merge-params sets seed), "
        "the weight search, the zoo (default 0)",
    )
    p.add_argument("--out", required=True, help="output model directory (loads with mcomp.load)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_from_option(p)
    p.set_defaults(func=run)


def _record(args, models: dict, weights) -> OutputRecord:
    """The recipe holds the models resolved (the zoo's too) and the searched weights, so that it
    composes again without a zoo build or a search."""
    import os

    resolved = ",".join(f"{m}={os.path.abspath(p)}" for m, p in models.items())
    inlined = {"models": resolved, "search_weights": False, "dev": None, "dev_root": None, "budget": None}
    if weights:
        inlined["weights"] = ",".join(f"{m}={w!r}" for m, w in weights.items())
    return OutputRecord.from_args(
        ["compose"],
        args,
        inlined=inlined,
        inputs={f"{m} model": str(p) for m, p in models.items()},
        summary=f"A {args.method} composition of the {', '.join(models)} models, merged with {args.merge}.",
    )


def _param_value(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _compose_on_disk(args, models: dict, merge: str, weights, params: dict) -> int:
    """Inputs with a fully fine-tuned LLM: the merged LLM streams to --out (mcomp.compose_checkpoint)."""
    from mcomp.checkpoint import read_config
    from mcomp.compose_checkpoint import compose_checkpoint

    unsupported = [
        flag
        for flag, given in (
            ("--search-weights", args.search_weights),
            ("--lora-rank", args.lora_rank is not None),
            ("--convert", args.convert),
            ("--merge-space factors", args.merge_space != "delta"),
        )
        if given
    ]
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: not available when an input's LLM is a full fine-tune")
    out = compose_checkpoint(
        models,
        args.out,
        record=_record(args, models, weights),
        method=args.method,
        merge=merge,
        weights=weights,
        merge_params=params,
        seed=args.seed,
        overwrite=args.force,
        progress=True,
    )
    comp = read_config(out).provenance["composition"]
    resolved = ", ".join(f"{m}={w:g}" for m, w in comp["weights"].items())
    print(
        f"composed {', '.join(comp['weights'])} with {comp['method']} + {comp['merge']} "
        f"(coefficients as resolved: {resolved}; the merged LLM streamed to disk); saved {args.out}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from mcomp.checkpoint import read_config
    from mcomp.compose import compose

    if args.models:
        models = parse_pairs(args.models, "--models")
    elif args.modalities:
        from mcomp.zoo import build_zoo

        zoo = build_zoo(args.zoo_size, args.seed)
        flavour = "damc" if args.method == "damc" else "naivemc"
        models = {m.strip(): zoo.model(m.strip(), flavour, 0) for m in args.modalities.split(",") if m.strip()}
    else:
        raise ValueError("give --models MODALITY=DIR,... or --modalities (which then uses the tiny zoo)")
    if args.modalities:
        wanted = [m.strip() for m in args.modalities.split(",") if m.strip()]
        if sorted(wanted) != sorted(models):
            raise ValueError(f"--modalities {wanted} and the keys of --models {sorted(models)} differ")
    merge = "dare_ties" if args.merge == "dare" else args.merge
    if merge not in available_methods():
        raise ValueError(f"--merge must be one of {', '.join(available_methods())}, got {args.merge!r}")
    weights = parse_pairs(args.weights, "--weights", float) or None
    params = parse_pairs(args.merge_params, "--merge-params", _param_value)
    kwargs = dict(
        method=args.method,
        merge=merge,
        merge_params=params,
        convert=args.convert,
        lora_rank=args.lora_rank,
        merge_space=args.merge_space,
    )
    if args.search_weights:
        if not args.dev:
            raise ValueError("--search-weights needs --dev DATA (a validation split)")
        from mcomp.compose import search_weights
        from mcomp.data import load_conversation_data

        dev = load_conversation_data(args.dev, args.dev_root)
        weights, best = search_weights(models, dev, budget=args.budget, seed=args.seed, **kwargs)
        print(f"searched weights: {weights} (dev mean log-likelihood {best:.4f})")
    if any(read_config(path).llm for path in models.values()):
        return _compose_on_disk(args, models, merge, weights, params)
    model = compose(models, weights=weights, seed=args.seed, **kwargs)
    comp = model.provenance["composition"]
    record = _record(args, models, weights)
    record.facts["coefficients"] = comp["weights"]
    model.save_pretrained(args.out, overwrite=args.force, inputs=list(models.values()), record=record)
    resolved = ", ".join(f"{m}={w:g}" for m, w in comp["weights"].items())
    print(
        f"composed {', '.join(model.modalities)} with {comp['method']} + {comp['merge']} "
        f"(coefficients as resolved: {resolved}); saved {args.out}"
    )
    return 0
