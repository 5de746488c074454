"""The leaderboard page: one self-contained HTML file (inline style and script, charts as data: URIs,
no request of any kind), built from the runs' results.json and samples.jsonl only.

Top to bottom: the overview of one metric (heatmap and per-benchmark charts, `leaderboard_overview`;
one block per metric, the first shown), the table of every metric (`leaderboard_table`), the drill-down
panel the script fills, and the list of runs. Without JavaScript the first metric's overview and the
whole table show as they are; the script (`leaderboard_script`) adds the metric switch, sorting,
filters and the drill-down, reading the page's data from an embedded JSON block: rows, columns, each
cell's runs, and the runs' per-sample records packed by `leaderboard_samples`.
"""

from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from mcomp.benchmarks.mcub.leaderboard import ColumnKey, Leaderboard, RowKey, build, finite, to_markdown
from mcomp.benchmarks.mcub.leaderboard_overview import benchmark_name, charts_img, heatmap_html
from mcomp.benchmarks.mcub.leaderboard_samples import pack_samples
from mcomp.benchmarks.mcub.leaderboard_script import JS
from mcomp.benchmarks.mcub.leaderboard_style import CSS
from mcomp.benchmarks.mcub.leaderboard_table import table_html
from mcomp.io import atomic_write_text

logger = logging.getLogger(__name__)

LEGEND = (
    "Cell: mean ± std across seeds (one run: ± its standard error). Colour: per column, from its lowest "
    "(pale) to its highest (dark) composition mean. <b>★</b> best mean in the column."
)


def metrics(board: Leaderboard) -> list[str]:
    """The board's metrics, in column order."""
    return list(dict.fromkeys(c.metric for c in board.columns))


def ids(board: Leaderboard) -> tuple[dict[RowKey, str], dict[ColumnKey, str]]:
    """Short ids of rows and columns (in page order), used by the markup, the data and the URL hash."""
    return {r: f"r{i}" for i, r in enumerate(board.rows)}, {c: f"c{i}" for i, c in enumerate(board.columns)}


def _value(v: float | None) -> float | None:
    return v if finite(v) else None


def page_data(board: Leaderboard) -> dict[str, Any]:
    """What the script needs: rows, columns, each cell's runs, and the runs' per-sample records."""
    row_ids, col_ids = ids(board)
    run_index = {run: k for k, run in enumerate(board.runs)}
    cells = {}
    for (row, col), members in board.members.items():
        cell = board.cells[(row, col)]
        cells[f"{row_ids[row]}:{col_ids[col]}"] = {
            "mean": _value(cell.value),
            "spread": _value(cell.stderr),
            "runs": [run_index[m.run_dir] for m in members],
            "values": [_value(m.value) for m in members],
            "stderr": [_value(m.stderr) for m in members],
            "n_samples": [m.n_samples for m in members],
        }
    samples = pack_samples((run, board.templates.get(run)) for run in board.runs)
    for run, packed in zip(board.runs, samples["runs"]):
        packed["row"] = row_ids[board.run_rows[run]]
    return {
        "metrics": metrics(board),
        "rows": [
            {
                "id": row_ids[r],
                "label": r.label(),
                "model": r.model,
                "method": r.method,
                "backend": r.backend,
                "modalities": board.modalities.get(r, "-"),
                "reference": r.is_reference,
            }
            for r in board.rows
        ],
        "columns": [
            {
                "id": col_ids[c],
                "label": benchmark_name(c, board),
                "task": c.task,
                "subset": c.subset,
                "mode": c.mode,
                "metric": c.metric,
            }
            for c in board.columns
        ],
        "cells": cells,
        **samples,
    }


def _json_block(value: Any) -> str:
    """JSON for a <script type=application/json>: no '<' at all, so nothing in it can end the element."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def overview_html(board: Leaderboard, row_ids: dict[RowKey, str], col_ids: dict[ColumnKey, str]) -> str:
    blocks = []
    for k, metric in enumerate(metrics(board)):
        hidden = " hidden" if k else ""
        blocks.append(
            f'<div class=metric-view data-metric="{html.escape(metric)}"{hidden}>'
            f"{heatmap_html(board, metric, row_ids, col_ids)}"
            f"<p class=legend>{LEGEND} <span class=jsonly>Click a cell for its runs and questions.</span></p>"
            f"{charts_img(board, metric)}</div>"
        )
    return f"<section id=overview>{''.join(blocks)}</section>"


def to_html(board: Leaderboard, title: str = "mcomp leaderboard") -> str:
    e = html.escape
    row_ids, col_ids = ids(board)
    n_compositions = sum(not r.is_reference for r in board.rows)
    options = "".join(f'<option value="{e(m)}">{e(m)}</option>' for m in metrics(board))
    summary = (
        f"{len(board.runs)} runs · {n_compositions} compositions, {len(board.rows) - n_compositions} reference "
        f"models · rows: model / method / merge backend"
    )
    runs = "".join(f"<li>{e(r)}</li>" for r in board.runs)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{e(title)}</h1><p>{summary}</p>"
        f"<label class=jsonly>metric <select id=metric>{options}<option value=all>all (table)</option></select>"
        "</label></header>"
        "<noscript><p class=note>JavaScript is off: the overview of the first metric and the table of every "
        "metric are shown as they are; the metric switch, sorting, filters and the per-sample drill-down need "
        "it.</p></noscript>"
        f"{overview_html(board, row_ids, col_ids)}"
        "<h2>Every metric</h2>"
        "<p class=legend><b>★</b> best mean in the column (highlighted). Reference models are listed apart, "
        "below the compositions. <span class=jsonly>Click a header to sort, a value for its runs and "
        "questions.</span></p>"
        "<div id=table-controls class='controls jsonly'></div>"
        f"<div class=scroll>{table_html(board, row_ids, col_ids)}</div>"
        "<section id=drill hidden></section>"
        f"<h2>Runs</h2><ul class=runs-list>{runs}</ul>"
        f"<script type=application/json id=lb-data>{_json_block(page_data(board))}</script>"
        f"<script>{JS}</script></body></html>\n"
    )


def write(
    run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, title: str = "mcomp leaderboard"
) -> dict[str, Path]:
    """leaderboard.md and index.html of the runs in `run_dirs` into `out_dir` (each written atomically)."""
    board = build(run_dirs)
    out = Path(out_dir)
    paths = {"markdown": out / "leaderboard.md", "html": out / "index.html"}
    atomic_write_text(paths["markdown"], f"# {title}\n\n" + to_markdown(board))
    page = to_html(board, title)
    atomic_write_text(paths["html"], page)
    logger.info("leaderboard: %d runs, %d rows, page %.0f kB", len(board.runs), len(board.rows), len(page) / 1e3)
    return paths
