"""The `mcomp` command. Each subcommand lives in `mcomp/commands/<name>.py` with
`add_parser(subparsers)`; it sets `func(args) -> int` on its parser."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import mcomp

SUBCOMMANDS = [
    "info",
    "ask",
    "train",
    "merge",
    "compose",
    "import_model",
    "eval",
    "leaderboard",
    "world",
    "zoo",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcomp",
        description="Compose single-modality multimodal LLMs that share a base LLM into one MLLM.",
    )
    parser.add_argument("--version", action="version", version=f"mcomp {mcomp.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"mcomp.commands.{name}").add_parser(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """The subcommand path named at the front of `argv` (e.g. ["import", "modelcompose"]) and its parser."""
    path, current = [], parser
    for token in argv:
        if token.startswith("-"):
            continue
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or token not in sub.choices:
            break
        path.append(token)
        current = sub.choices[token]
    return path, current


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    from mcomp.output_record import FROM_FLAG, apply_recipe  # (the commands' parsers have imported it)

    if any(t == FROM_FLAG or t.startswith(FROM_FLAG + "=") for t in argv):  # the recipe's arguments: defaults
        command, command_parser = _command_parser(parser, argv)
        try:
            apply_recipe(command_parser, command, argv)
        except (FileNotFoundError, ValueError) as err:
            print(f"mcomp {' '.join(command)}: error: {err}", file=sys.stderr)
            return 1
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        # Known user errors: one clear line, no traceback (use -vv for it).
        logging.getLogger("mcomp").debug("traceback", exc_info=True)
        print(f"mcomp {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
