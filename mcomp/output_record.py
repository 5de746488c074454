"""The record every output directory carries: its recipe and its model card.

`mcomp_recipe.yaml` holds the command and the arguments that made the output (input paths made
absolute, files such as a training config inlined), so that

    mcomp COMMAND --from OUT/mcomp_recipe.yaml --out OTHER

makes the same output again, byte for byte; flags given beside `--from` override the recipe's.
`README.md` is the model card: the command, its parameters, the inputs with their sha256, the
versions of the code, and the figures the command measured that do not vary between runs (wall
times go to the log only, so a reproduction gives the same card).

Both files are written by the writer of the output inside its atomic directory (`write`), so an
output never appears without them.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from mcomp.fingerprint import code_versions, directory_digest
from mcomp.io import sha256_file
from mcomp.resources import read_document

RECIPE_NAME = "mcomp_recipe.yaml"
CARD_NAME = "README.md"
RECIPE_FORMAT = 1
FROM_FLAG = "--from"

# arguments that say where or how an output is written, not what it is
# (and the subcommand names, which the recipe's `command` holds)
NOT_RECIPE = frozenset(
    {"out", "force", "no_progress", "threads", "checkpoint_dir", "from_recipe", "func", "verbose", "command", "kind"}
)


def input_sha256(path: str | os.PathLike) -> str:
    """sha256 of an input file, or `directory_digest` of an input directory."""
    if Path(path).is_file():
        return sha256_file(path)
    if not Path(path).is_dir():  # not the digest of nothing
        raise FileNotFoundError(f"{path}: an input of this output is neither a file nor a directory")
    return directory_digest(path)


@dataclass
class OutputRecord:
    """What an output directory says about itself. `command`: the subcommand path (e.g.
    ["import", "modelcompose"]); `arguments`: the recipe's arguments (argparse destinations);
    `inputs`: label -> path of what the output was made from (checksummed in the card);
    `summary`: one line on what was made; `facts`: figures the command measured (the writer adds
    its own), the same on every run."""

    command: list[str]
    arguments: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(
        cls,
        command: list[str],
        args: argparse.Namespace,
        *,
        paths: tuple[str, ...] = (),
        inlined: Mapping[str, Any] | None = None,
        inputs: Mapping[str, str | None] | None = None,
        summary: str = "",
    ) -> "OutputRecord":
        """The record of a command run with `args`: every argument but where the output goes;
        `paths` (argument names) made absolute; `inlined` replaces arguments by their resolved
        content (e.g. a config file by its fields)."""
        arguments = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_RECIPE and not callable(v)}
        for name in paths:
            value = arguments.get(name)
            if isinstance(value, str) and value and Path(value).exists():
                arguments[name] = os.path.abspath(value)
        arguments.update(inlined or {})
        arguments = {k: v for k, v in sorted(arguments.items()) if v is not None}  # unset: the parser's default
        present = {k: os.path.abspath(v) for k, v in (inputs or {}).items() if v}
        return cls(list(command), arguments, present, summary)

    def recipe(self) -> dict[str, Any]:
        return {
            "mcomp_recipe": RECIPE_FORMAT,
            "command": self.command,
            "arguments": self.arguments,
        }

    def recipe_text(self) -> str:
        head = (
            f"# The recipe of this output: `mcomp {' '.join(self.command)} {FROM_FLAG} {RECIPE_NAME} --out OTHER`\n"
            f"# makes it again, byte for byte (flags given beside {FROM_FLAG} override these arguments).\n"
        )
        return head + yaml.safe_dump(_plain(self.recipe()), sort_keys=True, allow_unicode=True)

    def card_text(self, facts: Mapping[str, Any]) -> str:
        versions = code_versions()
        lines = [
            "---",
            f"library_name: {'mcomp'}",
            "tags:",
            "- mcomp",
            f"- {self.command[-1]}",
            "---",
            "",
            f"# mcomp {' '.join(self.command)}",
            "",
        ]
        if self.summary:
            lines += [self.summary, ""]
        lines += ["## Parameters", "", "| argument | value |", "|---|---|"]
        for key, value in _flat(self.arguments):
            lines.append(f"| `{key}` | {_cell(value)} |")
        if self.inputs:
            lines += ["", "## Inputs", "", "| input | path | sha256 |", "|---|---|---|"]
            for label, path in self.inputs.items():
                lines.append(f"| {label} | `{path}` | `{input_sha256(path)}` |")
        if facts:
            lines += ["", "## Measured", "", "| figure | value |", "|---|---|"]
            for key, value in facts.items():
                lines.append(f"| {key} | {_cell(value)} |")
        lines += ["", "## Versions", "", "| package | version |", "|---|---|"]
        lines += [f"| {name} | {version} |" for name, version in versions.items()]
        lines += [
            "",
            "## Reproduce",
            "",
            "```bash",
            f"mcomp {' '.join(self.command)} {FROM_FLAG} {RECIPE_NAME} --out OTHER",
            "```",
            "",
        ]
        return "\n".join(lines)

    def write(self, directory: str | os.PathLike, facts: Mapping[str, Any] | None = None) -> None:
        """Write the recipe and the card into `directory` (the writer's atomic temporary directory)."""
        directory = Path(directory)
        (directory / RECIPE_NAME).write_text(self.recipe_text(), encoding="utf-8")
        (directory / CARD_NAME).write_text(self.card_text({**self.facts, **(facts or {})}), encoding="utf-8")


def _plain(value: Any) -> Any:
    """YAML-safe: tuples as lists, paths as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _flat(arguments: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) of every argument, a mapping's entries one by one."""
    rows = []
    for key, value in sorted(arguments.items()):
        if isinstance(value, dict) and value:
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(_plain(value), sort_keys=True)
    return text.replace("|", "\\|").replace("\n", " ")


def read_recipe(path: str | os.PathLike, command: list[str]) -> dict[str, Any]:
    """The arguments of the recipe in `path`, checked to be one of `command`'s."""
    data = read_document(path, "recipe", dict)
    if data.get("mcomp_recipe") != RECIPE_FORMAT:
        raise ValueError(f"{path}: not an mcomp recipe (format {RECIPE_FORMAT}); it is written next to an output")
    if data.get("command") != command:
        got = " ".join(data.get("command") or []) or "?"
        raise ValueError(f"{path}: a recipe of `mcomp {got}`, given to `mcomp {' '.join(command)}`")
    arguments = data.get("arguments")
    if not isinstance(arguments, dict):
        raise ValueError(f"{path}: 'arguments' must be a mapping")
    return arguments


def add_from_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        FROM_FLAG,
        dest="from_recipe",
        metavar="RECIPE",
        help=f"make an output again from the {RECIPE_NAME} written next to an earlier one (its arguments; "
        "flags given here override them)",
    )


def apply_recipe(parser: argparse.ArgumentParser, command: list[str], argv: list[str]) -> None:
    """Before parsing `argv` (which holds `--from RECIPE`): the recipe's arguments become the
    defaults of the command's `parser`, and arguments it provides are no longer required."""
    path = _from_value(argv)
    arguments = read_recipe(path, command)
    known = {a.dest: a for a in parser._actions}
    unknown = sorted(set(arguments) - set(known))
    if unknown:
        raise ValueError(f"{path}: argument(s) {unknown} are not options of `mcomp {' '.join(command)}`")
    parser.set_defaults(**arguments)
    for dest in arguments:
        action = known[dest]
        action.required = False
        if not action.option_strings:  # a positional: optional now, its value from the recipe
            action.nargs = "?"
            action.default = arguments[dest]
    for group in parser._mutually_exclusive_groups:
        if any(a.dest in arguments for a in group._group_actions):
            group.required = False


def _from_value(argv: list[str]) -> str:
    for i, token in enumerate(argv):
        if token == FROM_FLAG and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(FROM_FLAG + "="):
            return token.split("=", 1)[1]
    raise ValueError(f"{FROM_FLAG} needs a recipe file")
