"""Leaderboard from evaluation run directories: a Markdown table and a self-contained HTML page.

Rows are model x composition method x merge backend (read from each run's provenance); columns are
task / subset / mode / metric. The HTML page embeds one bar chart per column (matplotlib PNG as
base64, error bars = standard error), so it opens from disk in any browser, without a server.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mcomp.benchmarks.mcub.results import ResultsFile
from mcomp.io import atomic_write_text

logger = logging.getLogger(__name__)

# Provenance keys read for the row labels, first present wins.
METHOD_KEYS = ("method", "composition_method", "strategy")
BACKEND_KEYS = ("merge_backend", "backend", "merge")
NONE = "-"


@dataclasses.dataclass(frozen=True, order=True)
class RowKey:
    model: str
    method: str
    backend: str

    def label(self) -> str:
        return " / ".join(x for x in (self.model, self.method, self.backend) if x != NONE) or self.model


@dataclasses.dataclass(frozen=True, order=True)
class ColumnKey:
    task: str
    subset: str
    mode: str
    metric: str

    def label(self) -> str:
        return f"{self.task} / {self.subset} ({self.mode}, {self.metric})"


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


def load_run(run_dir: str | os.PathLike) -> ResultsFile:
    """A run's results.json (the run folder or the file itself), read and checked by its schema."""
    path = Path(run_dir) / "results.json" if Path(run_dir).is_dir() else Path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no results.json (is the run finished?)")
    return ResultsFile.read(path)


@dataclasses.dataclass
class Leaderboard:
    rows: list[RowKey]
    columns: list[ColumnKey]
    cells: dict[tuple[RowKey, ColumnKey], Cell]
    runs: list[str]


def build(run_dirs: Iterable[str | os.PathLike]) -> Leaderboard:
    cells: dict[tuple[RowKey, ColumnKey], Cell] = {}
    runs_of: dict[tuple[RowKey, ColumnKey], list[Cell]] = {}  # several runs (seeds) of one cell
    runs = []
    seen: dict[ColumnKey, int] = {}  # first appearance: subsets keep their task-file order
    for run_dir in run_dirs:
        data = load_run(run_dir)
        runs.append(str(Path(run_dir) / "results.json" if Path(run_dir).is_dir() else Path(run_dir)))
        row = row_key(data)
        for r in data.results:
            col = ColumnKey(r.task, r.subset, r.mode, r.metric)
            seen.setdefault(col, len(seen))
            runs_of.setdefault((row, col), []).append(Cell(r.value, r.stderr, r.n_samples, str(run_dir)))
    for key, group in runs_of.items():
        cells[key] = group[0] if len(group) == 1 else _aggregate(group)
    if not cells:
        raise ValueError("no results in the given run directories")
    rows = sorted({k[0] for k in cells})
    group_first: dict[tuple[str, str, str], int] = {}
    for col, i in seen.items():
        group_first.setdefault((col.task, col.subset, col.mode), i)
    columns = sorted(
        seen, key=lambda c: (c.task, c.mode, c.subset == "mean", group_first[(c.task, c.subset, c.mode)], seen[c])
    )
    return Leaderboard(rows, columns, cells, runs)


def _aggregate(group: list[Cell]) -> Cell:
    """Runs of the same row and column (e.g. seeds): mean, and the sample std across runs as spread."""
    values = [
        c.value for c in group if c.value is not None and not (isinstance(c.value, float) and math.isnan(c.value))
    ]
    if not values:
        return Cell(None, None, group[0].n_samples, group[0].run_dir, len(group))
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else None
    return Cell(mean, spread, sum(c.n_samples for c in group), ", ".join(c.run_dir for c in group), len(group))


def _fmt(cell: Cell | None) -> str:
    if cell is None or cell.value is None or (isinstance(cell.value, float) and math.isnan(cell.value)):
        return NONE
    if cell.stderr is None or (isinstance(cell.stderr, float) and math.isnan(cell.stderr)):
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


def chart_png(board: Leaderboard, column: ColumnKey) -> bytes:
    """Horizontal bars (one per row that has this column), error bars = standard error."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in board.rows if (r, column) in board.cells]
    values = [board.cells[(r, column)].value or 0.0 for r in rows]
    errors = [board.cells[(r, column)].stderr or 0.0 for r in rows]
    errors = [0.0 if (isinstance(e, float) and math.isnan(e)) else e for e in errors]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.2), dpi=100)
    try:
        positions = list(range(len(rows)))
        ax.barh(positions, values, xerr=errors, color="#4c78a8", ecolor="#333333", capsize=3)
        ax.set_yticks(positions, [r.label() for r in rows])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"{column.metric} (%)")
        ax.set_title(column.label(), fontsize=10)
        for y, v, err in zip(positions, values, errors):
            ax.text(min(v + err + 1.5, 90), y, f"{v:.1f}", va="center", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; text-align: center; } .name { text-align: left; }
.scroll { overflow-x: auto; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; } .charts figure { margin: 0; }
.runs { font-size: 12px; color: #666; }
"""


def to_html(board: Leaderboard, title: str = "mcomp leaderboard") -> str:
    e = html.escape
    groups: list[tuple[tuple[str, str, str], list[ColumnKey]]] = []  # (task, subset, mode) -> its metric columns
    for col in board.columns:
        key = (col.task, col.subset, col.mode)
        if groups and groups[-1][0] == key:
            groups[-1][1].append(col)
        else:
            groups.append((key, [col]))
    top = "".join(f"<th rowspan=2 class=name>{h}</th>" for h in ("model", "method", "merge backend"))
    top += "".join(
        f"<th colspan={len(cols)}>{e(task)}<br>{e(subset)}<br><small>{e(mode)}</small></th>"
        for (task, subset, mode), cols in groups
    )
    second = "".join(f"<th>{e(c.metric)}</th>" for _, cols in groups for c in cols)
    body = []
    for row in board.rows:
        cells = "".join(f"<td>{e(_fmt(board.cells.get((row, c))))}</td>" for c in board.columns)
        body.append(
            f"<tr><td class=name>{e(row.model)}</td><td class=name>{e(row.method)}</td>"
            f"<td class=name>{e(row.backend)}</td>{cells}</tr>"
        )
    charts = []
    for col in board.columns:
        data = base64.b64encode(chart_png(board, col)).decode("ascii")
        charts.append(f'<figure><img alt="{e(col.label())}" src="data:image/png;base64,{data}"></figure>')
    runs = "".join(f"<li>{e(r)}</li>" for r in board.runs)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{e(title)}</h1><p>Accuracy in % &plusmn; standard error. Rows: model / composition method / "
        f"merge backend (from each run's provenance).</p>"
        f"<div class=scroll><table><thead><tr>{top}</tr><tr>{second}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
        f"<h2>Charts</h2><div class=charts>{''.join(charts)}</div>"
        f"<h2>Runs</h2><ul class=runs>{runs}</ul></body></html>\n"
    )


def write(
    run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, title: str = "mcomp leaderboard"
) -> dict[str, Path]:
    board = build(run_dirs)
    out = Path(out_dir)
    paths = {"markdown": out / "leaderboard.md", "html": out / "index.html"}
    atomic_write_text(paths["markdown"], f"# {title}\n\n" + to_markdown(board))
    atomic_write_text(paths["html"], to_html(board, title))
    return paths
