"""`mcomp leaderboard RUN_DIRS... --out DIR`: Markdown table + static HTML page with charts."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by `mcomp eval`")
    p.add_argument("--out", required=True, help="output directory (leaderboard.md, index.html)")
    p.add_argument("--title", default="mcomp leaderboard", help="the page's title (default: mcomp leaderboard)")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "leaderboard", help="tabulate and chart evaluation runs (Markdown + static HTML)", description=__doc__
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mcomp.benchmarks.mcub.leaderboard_page import write

    paths = write(args.runs, args.out, args.title)
    print(f"markdown: {paths['markdown']}")
    print(f"html: {paths['html']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mcomp leaderboard", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"mcomp leaderboard: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
