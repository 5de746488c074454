"""`mcomp demo`: zoo, compositions (NaiveMC/DAMC x every merge backend), synthetic MCUB, leaderboard."""

from __future__ import annotations

from pathlib import Path

from mcomp.commands.zoo import add_zoo_options, zoo_modalities


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="compose and evaluate the tiny zoo on the synthetic MCUB")
    p.add_argument("--size", default="full", help="full (3 seeds per cell) or test (reduced)")
    p.add_argument("--seed", type=int, default=0, help="world and zoo seed")
    p.add_argument("--root", help="zoo directory (default: the user cache directory)")
    p.add_argument("--out", default="runs/demo", help="where runs, leaderboard.md and index.html go")
    p.add_argument(
        "--mode",
        choices=("loglik", "generate"),
        default="loglik",
        help="score each option by log-likelihood, or generate an answer and match it (default loglik)",
    )
    p.add_argument(
        "--merge",
        help="comma-separated merge backends to compose with, any registered ones (default: linear, ties, "
        "dare_ties, pcb; each with the demo's parameters where it has some, else the method's defaults)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="processes running training and evaluation jobs (default: 2 on 2+ cores; 1: in this process)",
    )
    add_zoo_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from mcomp.zoo.demo import demo_merges, run_demo

    modalities = zoo_modalities(args)
    merges = demo_merges(args.merge.split(",")) if args.merge else None
    summary = run_demo(
        args.size,
        args.seed,
        args.out,
        args.mode,
        args.root,
        workers=args.workers,
        modalities=modalities,
        llm_shape=args.llm_shape,
        merges=merges,
    )
    print(Path(summary["leaderboard"]["demo_markdown"]).read_text())
    print(f"zoo: {summary['zoo']} ({summary['seconds_zoo']} s); total {summary['seconds_total']} s")
    print(f"leaderboard page: {summary['leaderboard']['html']}")
    return 0
