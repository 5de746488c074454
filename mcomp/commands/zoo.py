"""`mcomp zoo build`: build (or reuse) the tiny model zoo trained on the synthetic world."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("zoo", help="build the tiny model zoo behind the demo (cached)")
    p.add_argument("action", choices=("build", "path"), help="build (or reuse) the zoo, or print where it is")
    p.add_argument("--size", default="full", help="full (the demo) or test (reduced)")
    p.add_argument("--seed", type=int, default=0, help="world and zoo seed (default 0)")
    p.add_argument("--root", help="where to build it (default: the user cache directory, or $MCOMP_CACHE)")
    p.add_argument(
        "--workers", type=int, help="processes running the training jobs (default: 2 on 2+ cores; 1: in this process)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="discard what the zoo folder holds (a partial build, or one of other code) and build anew",
    )
    add_zoo_options(p)
    p.set_defaults(func=run)


def add_zoo_options(p) -> None:
    """What a zoo is made of beyond its size: added modalities and the base LLM's shape (zoo, demo)."""
    p.add_argument(
        "--modality",
        action="append",
        metavar="FILE",
        help="add the modality of a modality file (docs/adding_a_modality.md) to the built-in four; repeatable",
    )
    p.add_argument(
        "--llm-shape",
        help="the base LLM's shape and architecture, a configs/llm file (e.g. demo-qwen2, tiny-qwen2; default: "
        "the size's Llama)",
    )


def zoo_modalities(args) -> list | None:
    """The built-in modalities and those of --modality files (None: the built-in ones alone)."""
    from mcomp.modalities import ORDER

    return [*ORDER, *args.modality] if args.modality else None


def run(args) -> int:
    from mcomp.zoo import build_zoo, default_root
    from mcomp.zoo.build import held_out_report

    modalities = zoo_modalities(args)
    if args.action == "path":
        print(args.root or default_root(args.size, args.seed, modalities=modalities, llm_shape=args.llm_shape))
        return 0
    zoo = build_zoo(
        args.size, args.seed, args.root, args.workers, force=args.force, modalities=modalities, llm_shape=args.llm_shape
    )
    accuracy = held_out_report(zoo.manifest)
    print(f"zoo ready at {zoo.root}")
    print("held-out attribute accuracy of the single-modality models:")
    print(json.dumps(accuracy, indent=1, sort_keys=True))
    return 0
