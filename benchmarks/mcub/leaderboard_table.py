"""The leaderboard page's table: every row and every metric column, rendered in the file (so it reads
without JavaScript), with the data the page's script sorts and filters by.

Each row carries its model, method, merge backend and modality set (`data-*`: filters and sort keys);
each value cell its mean to six decimals (`data-v`, the sort key) and its row and column ids (the
drill-down). The best mean of each column is marked with ★ (explained in the legend). Reference rows
are a body of their own below the compositions: sorting and filtering keep them apart.
"""

from __future__ import annotations

import html

from mcomp.benchmarks.mcub.leaderboard import ColumnKey, Leaderboard, RowKey, finite
from mcomp.benchmarks.mcub.leaderboard_overview import benchmark_name, spread_text

LABEL_COLUMNS = (("model", "model"), ("method", "method"), ("backend", "merge"), ("modalities", "modalities"))


def table_html(board: Leaderboard, row_ids: dict[RowKey, str], col_ids: dict[ColumnKey, str]) -> str:
    e = html.escape
    head = "".join(f"<th data-col={key} class=lab>{name}</th>" for key, name in LABEL_COLUMNS)
    head += "".join(
        f'<th data-col={col_ids[c]} data-metric="{e(c.metric)}" title="{e(c.label())}">'
        f"{e(benchmark_name(c, board))}<br><small>{e(c.metric)}</small></th>"
        for c in board.columns
    )
    best = {c: board.best_rows(c) for c in board.columns}
    bodies: dict[bool, list[str]] = {False: [], True: []}  # is_reference -> rows
    for row in board.rows:
        modalities = board.modalities.get(row, "-")
        labels = "".join(f"<td class=lab>{e(text)}</td>" for text in (row.model, row.method, row.backend, modalities))
        cells = []
        for c in board.columns:
            cell = board.cells.get((row, c))
            attrs = f'data-col={col_ids[c]} data-metric="{e(c.metric)}"'
            if cell is None or not finite(cell.value):
                cells.append(f"<td {attrs}></td>")
                continue
            mark = " class=best" if row in best[c] else ""
            star = "<b>★</b>" if row in best[c] else ""
            runs = f"<i>n={cell.n_runs}</i>" if cell.n_runs > 1 else ""
            cells.append(
                f'<td {attrs} data-row={row_ids[row]} data-v="{cell.value:.6f}"{mark}>'
                f"{cell.value:.2f} <small>{spread_text(cell, 2)}</small>{runs}{star}</td>"
            )
        bodies[row.is_reference].append(
            f'<tr data-row={row_ids[row]} data-model="{e(row.model)}" data-method="{e(row.method)}" '
            f'data-backend="{e(row.backend)}" '
            f'data-modalities="{e(modalities)}">{labels}{"".join(cells)}</tr>'
        )
    refs = ""
    if bodies[True]:
        divider = f"<tr class=divider><th colspan={len(LABEL_COLUMNS) + len(board.columns)}>reference models</th></tr>"
        refs = f"<tbody class=ref>{divider}{''.join(bodies[True])}</tbody>"
    return (
        f"<table id=board-table class=board><thead><tr>{head}</tr></thead>"
        f"<tbody class=comp>{''.join(bodies[False])}</tbody>{refs}</table>"
    )
