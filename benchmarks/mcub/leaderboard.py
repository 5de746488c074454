"""Leaderboard from evaluation run directories: the table of cells, as Markdown and as a self-contained page.

Rows are model x composition method x merge backend (read from each run's provenance); columns are
task / subset / mode / metric, MCUB-4 first. Runs of one row and column (seeds) are averaged: mean and
the sample std across runs. Reference rows (the base LLM, single-modality models) are set apart from the
compositions. The HTML page (`leaderboard_page`) is built from the same board and the runs' per-sample
records; it opens from disk in any browser, without a server.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mcomp.benchmarks.mcub.results import MEAN, ResultsFile

logger = logging.getLogger(__name__)

# Provenance keys read for the row labels, first present wins.
METHOD_KEYS = ("method", "composition_method", "strategy")
BACKEND_KEYS = ("merge_backend", "backend", "merge")
NONE = "-"
# Composition methods of the reference rows: the base LLM and each single-modality model (mcomp demo)
REFERENCE_METHODS = ("base", "single")
# Task families in the order the leaderboard shows them; other tasks follow, by name.
TASK_ORDER = ("mcub4", "mcub3")


@dataclasses.dataclass(frozen=True, order=True)
class RowKey:
    model: str
    method: str
    backend: str

    def label(self) -> str:
        return " / ".join(x for x in (self.model, self.method, self.backend) if x != NONE) or self.model

    @property
    def is_reference(self) -> bool:
        """A model that is not a composition (base LLM, single-modality model): a reference row."""
        return self.method in REFERENCE_METHODS or self.method == NONE


@dataclasses.dataclass(frozen=True, order=True)
class ColumnKey:
    task: str
    subset: str
    mode: str
    metric: str

    def label(self) -> str:
        return f"{self.task} / {self.subset} ({self.mode}, {self.metric})"

    @property
    def benchmark(self) -> tuple[str, str, str]:
        """The question file (or a task's mean over its files) scored, and how: one heatmap column."""
        return (self.task, self.subset, self.mode)


@dataclasses.dataclass
class Cell:
    value: float | None  # the mean over runs (seeds) of this row and column
    stderr: float | None  # one run: the metric's standard error; several: the std across runs
    n_samples: int
    run_dir: str
    n_runs: int = 1


def _first(prov: Mapping[str, Any], keys: Sequence[str]) -> str:
    for k in keys:
        v = prov.get(k)
        if v not in (None, ""):
            return str(v)
    return NONE


def row_key(results: ResultsFile) -> RowKey:
    prov = results.provenance
    model = results.model.get("name") or prov.get("name") or NONE
    composition = prov.get("composition") or prov  # mcomp.compose records it under "composition"
    return RowKey(str(model), _first(composition, METHOD_KEYS), _first(composition, BACKEND_KEYS))


def modality_set(results: ResultsFile) -> str:
    """The modalities the run's model reads, as "image+audio" (its model section), or "-"."""
    modalities = results.model.get("modalities")
    return "+".join(str(m) for m in modalities) if isinstance(modalities, (list, tuple)) and modalities else NONE


def results_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "results.json" if Path(run_dir).is_dir() else Path(run_dir)


def load_run(run_dir: str | os.PathLike) -> ResultsFile:
    """A run's results.json (the run folder or the file itself), read and checked by its schema."""
    path = results_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no results.json (is the run finished?)")
    return ResultsFile.read(path)


@dataclasses.dataclass
class Leaderboard:
    rows: list[RowKey]  # compositions first, then the reference rows
    columns: list[ColumnKey]
    cells: dict[tuple[RowKey, ColumnKey], Cell]
    runs: list[str]  # the run directories (or results files), sorted
    members: dict[tuple[RowKey, ColumnKey], list[Cell]] = dataclasses.field(default_factory=dict)  # each run's cell
    run_rows: dict[str, RowKey] = dataclasses.field(default_factory=dict)  # run -> its row
    modalities: dict[RowKey, str] = dataclasses.field(default_factory=dict)  # row -> its modality set
    templates: dict[str, str | None] = dataclasses.field(default_factory=dict)  # run -> its prompt template

    def best_rows(self, column: ColumnKey) -> set[RowKey]:
        """The rows with the highest mean in `column` (every metric is higher-is-better), where two or more
        rows have a value to compare."""
        scored = {r: c.value for (r, col), c in self.cells.items() if col == column and finite(c.value)}
        if len(scored) < 2:
            return set()
        top = max(scored.values())
        return {r for r, v in scored.items() if v == top}


def finite(value: float | None) -> bool:
    """Whether a cell holds a number (not missing, not NaN)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _task_rank(task: str) -> tuple[int, str, bool, str]:
    """MCUB-4 before MCUB-3 before the other tasks; a family's full task before its reduced variants
    ("mcub4" before "mcub4[image+audio]")."""
    family = task.split("[", 1)[0]
    rank = TASK_ORDER.index(family) if family in TASK_ORDER else len(TASK_ORDER)
    return (rank, family, task != family, task)


def build(run_dirs: Iterable[str | os.PathLike]) -> Leaderboard:
    members: dict[tuple[RowKey, ColumnKey], list[Cell]] = {}  # several runs (seeds) of one cell
    runs, run_rows, modalities, templates = [], {}, {}, {}
    seen: dict[ColumnKey, int] = {}  # first appearance: subsets keep their task-file order
    for run_dir in sorted({str(d) for d in run_dirs}):  # sorted: the same runs give the same page
        data = load_run(run_dir)
        runs.append(run_dir)
        row = row_key(data)
        run_rows[run_dir] = row
        modalities.setdefault(row, modality_set(data))
        templates[run_dir] = data.prompt.get("template")
        for r in data.results:
            col = ColumnKey(r.task, r.subset, r.mode, r.metric)
            seen.setdefault(col, len(seen))
            members.setdefault((row, col), []).append(Cell(r.value, r.stderr, r.n_samples, run_dir))
    cells = {key: group[0] if len(group) == 1 else _aggregate(group) for key, group in members.items()}
    if not cells:
        raise ValueError("no results in the given run directories")
    rows = sorted({k[0] for k in cells}, key=lambda r: (r.is_reference, r))
    group_first: dict[tuple[str, str, str], int] = {}
    for col, i in seen.items():
        group_first.setdefault(col.benchmark, i)
    columns = sorted(
        seen, key=lambda c: (_task_rank(c.task), c.mode, c.subset == MEAN, group_first[c.benchmark], seen[c])
    )
    return Leaderboard(rows, columns, cells, runs, members, run_rows, modalities, templates)


def _aggregate(group: list[Cell]) -> Cell:
    """Runs of the same row and column (e.g. seeds): mean, and the sample std across runs as spread."""
    values = [c.value for c in group if finite(c.value)]
    if not values:
        return Cell(None, None, group[0].n_samples, group[0].run_dir, len(group))
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return Cell(mean, spread, sum(c.n_samples for c in group), ", ".join(c.run_dir for c in group), len(group))


def _fmt(cell: Cell | None) -> str:
    if cell is None or not finite(cell.value):
        return NONE
    if not finite(cell.stderr):
        return f"{cell.value:.2f}"
    runs = f" (n={cell.n_runs})" if cell.n_runs > 1 else ""
    return f"{cell.value:.2f} ± {cell.stderr:.2f}{runs}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(board: Leaderboard) -> str:
    head = ["model", "method", "merge backend"] + [c.label() for c in board.columns]
    lines = ["| " + " | ".join(_md_escape(h) for h in head) + " |", "|" + "---|" * len(head)]
    for row in board.rows:
        values = [_fmt(board.cells.get((row, c))) for c in board.columns]
        lines.append("| " + " | ".join(_md_escape(x) for x in [row.model, row.method, row.backend, *values]) + " |")
    return "\n".join(lines) + "\n"
