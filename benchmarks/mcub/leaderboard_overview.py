"""The leaderboard page's overview of one metric: a heatmap and one compact chart per benchmark.

The heatmap is an HTML table (rows: model / method / merge backend, compositions above the reference
rows; columns: the benchmarks, MCUB-4 first; cells: mean ± spread across seeds), coloured per column
from its lowest to its highest composition mean, so that differences of a point show even when every
composition sits between 91 and 100. The charts are one matplotlib PNG (embedded, so they show without
JavaScript): per benchmark answered by compositions, each composition's mean, its spread and its seeds'
values on an axis that follows the data, the value written in a margin column beside the plot.
"""

from __future__ import annotations

import base64
import html
import io
import math
import textwrap

from mcomp.benchmarks.mcub.leaderboard import MEAN, NONE, Cell, ColumnKey, Leaderboard, RowKey, finite

# Sequential palette, pale (the column's lowest composition mean) to dark (its highest); ColorBrewer YlGnBu.
PALETTE = ("#ffffd9", "#edf8b1", "#c7e9b4", "#7fcdbb", "#41b6c4", "#1d91c0", "#225ea8", "#0c2c84")
NEUTRAL = "#e3e3e3"  # a column's only value: nothing to compare it with
DARK_FROM = 0.62  # palette position from which a cell's text is white
MIN_SPAN = 1.0  # points: a column whose compositions lie closer than this is not stretched further
CHART_COLUMNS = 4
CHART_WIDTH_IN = 12.6  # the overview's width at 100 px per inch
CHART_DPI = 150  # 1.5 px per CSS pixel: sharp on most screens, small enough to embed
PALETTE_COLOURS = 64
# the charts' layout, in inches at 100 px per inch (fonts of 8 pt)
CHAR_WIDTH_IN = 0.056  # a row label's character
TITLE_CHAR_IN = 0.066  # a title's character
VALUE_WIDTH_IN = 0.75  # the column of values right of each plot
ROW_HEIGHT_IN = 0.125
TITLE_IN = 0.36  # above a plot: two title lines
AXIS_IN = 0.36  # below a plot: ticks and the metric's note
EDGE_IN = 0.04  # left of each panel's title
PANEL_EXTRA_IN = TITLE_IN + AXIS_IN + 0.08


def metric_columns(board: Leaderboard, metric: str) -> list[ColumnKey]:
    return [c for c in board.columns if c.metric == metric]


def benchmark_name(column: ColumnKey, board: Leaderboard) -> str:
    """A benchmark's short name: the subset of a one-file task ("MCUB-4[image+audio]"), else task and subset;
    the mode too where the board has several."""
    subsets = {c.subset for c in board.columns if c.task == column.task}
    name = column.subset if len(subsets) == 1 and column.subset != MEAN else f"{column.task} {column.subset}"
    return name if len({c.mode for c in board.columns}) == 1 else f"{name} ({column.mode})"


def _wrappable(text: str) -> str:
    """HTML text that may break after '-', '+' and before '[' (narrow heatmap columns)."""
    out = html.escape(text)
    for sep in ("-", "+"):
        out = out.replace(sep, sep + "<wbr>")
    return out.replace("[", "<wbr>[").replace(" ", "<br>", 1)


def colour_scale(board: Leaderboard, column: ColumnKey) -> tuple[float, float] | None:
    """The (low, high) a column's colours span: its composition means (all rows' where it has none);
    None where there is a single value, nothing to compare it with."""
    values = [c.value for (r, col), c in board.cells.items() if col == column and finite(c.value)]
    composed = [
        c.value for (r, col), c in board.cells.items() if col == column and finite(c.value) and not r.is_reference
    ]
    values = composed or values
    if len(values) < 2:
        return None
    low, high = min(values), max(values)
    return min(low, high - MIN_SPAN), high


def colour(value: float, scale: tuple[float, float] | None) -> tuple[str, str]:
    """(background, text colour) of a value on the column's scale; values below it take the palest colour."""
    if scale is None:
        return NEUTRAL, "#111"
    low, high = scale
    t = min(1.0, max(0.0, (value - low) / (high - low)))
    return PALETTE[min(len(PALETTE) - 1, int(t * len(PALETTE)))], ("#fff" if t >= DARK_FROM else "#111")


def spread_text(cell: Cell, digits: int = 1) -> str:
    return f"±{cell.stderr:.{digits}f}" if finite(cell.stderr) else ""


def heatmap_html(board: Leaderboard, metric: str, row_ids: dict[RowKey, str], col_ids: dict[ColumnKey, str]) -> str:
    e = html.escape
    columns = metric_columns(board, metric)
    scales = {c: colour_scale(board, c) for c in columns}
    best = {c: board.best_rows(c) for c in columns}
    head = "<th class=lab>model</th><th class=lab>method</th><th class=lab>merge</th>" + "".join(
        f'<th data-col={col_ids[c]} title="{e(c.label())}">{_wrappable(benchmark_name(c, board))}</th>' for c in columns
    )
    bodies = {False: [], True: []}  # is_reference -> rows
    previous = {False: None, True: None}
    for row in board.rows:
        group = row.is_reference
        same = " class=same" if previous[group] == row.model else ""
        previous[group] = row.model
        cells = []
        for c in columns:
            cell = board.cells.get((row, c))
            if cell is None or not finite(cell.value):
                cells.append("<td class=na></td>")
                continue
            background, ink = colour(cell.value, scales[c])
            mark = '<b class=best title="best mean in the column">★</b>' if row in best[c] else ""
            runs = f"{cell.n_runs} runs" if cell.n_runs > 1 else "1 run, ± standard error"
            cells.append(
                f'<td class=v data-row={row_ids[row]} data-col={col_ids[c]} style="background:{background};color:{ink}"'
                f' title="{e(row.label())} · {e(benchmark_name(c, board))}: {cell.value:.2f} {spread_text(cell, 2)} '
                f'({runs})">{cell.value:.1f}<small>{spread_text(cell)}</small>{mark}</td>'
            )
        bodies[group].append(
            f"<tr data-row={row_ids[row]}><th{same}>{e(row.model)}</th><td class=lab>{e(row.method)}</td>"
            f"<td class=lab>{e(row.backend)}</td>{''.join(cells)}</tr>"
        )
    refs = ""
    if bodies[True]:
        divider = f"<tr class=divider><th colspan={3 + len(columns)}>reference models (not compositions)</th></tr>"
        refs = f"<tbody class=ref>{divider}{''.join(bodies[True])}</tbody>"
    return (
        f'<table class=heat data-metric="{e(metric)}"><thead><tr>{head}</tr></thead>'
        f"<tbody class=comp>{''.join(bodies[False])}</tbody>{refs}</table>"
    )


def _distinct_labels(rows: list[RowKey]) -> tuple[list[str], str]:
    """Labels of `rows` without the parts all of them share, and the shared model name ("" if none)."""
    parts = [(r.model, r.method, r.backend) for r in rows]
    keep = [k for k in range(3) if len({p[k] for p in parts}) > 1] or [1, 2]
    labels = [" / ".join(p[k] for k in keep if p[k] != NONE) or rows[i].model for i, p in enumerate(parts)]
    shared = parts[0][0] if 0 not in keep and len(rows) > 1 else ""
    return labels, shared


def chart_rows(board: Leaderboard, column: ColumnKey) -> list[RowKey]:
    """The compositions answering `column`, best mean first (the references are noted, not plotted)."""
    rows = [
        r
        for r in board.rows
        if not r.is_reference and (r, column) in board.cells and finite(board.cells[(r, column)].value)
    ]
    return sorted(rows, key=lambda r: (-board.cells[(r, column)].value, r))


def _axis_range(points: list[float]) -> tuple[float, float]:
    low, high = min(points), max(points)
    if high - low < 2 * MIN_SPAN:
        middle = (low + high) / 2
        low, high = middle - MIN_SPAN, middle + MIN_SPAN
    pad = 0.08 * (high - low)
    return max(0.0, low - pad), high + pad


def charts_png(board: Leaderboard, metric: str) -> bytes | None:
    """The compact charts of one metric as one PNG, or None when no benchmark has compositions."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    columns = [c for c in metric_columns(board, metric) if chart_rows(board, c)]
    if not columns:
        return None
    n_cols = min(CHART_COLUMNS, len(columns))
    n_grid_rows = math.ceil(len(columns) / n_cols)
    tallest = max(len(chart_rows(board, c)) for c in columns)
    labels = [label for c in columns for label in _distinct_labels(chart_rows(board, c))[0]]
    # inches, at 8 pt: row labels left of each plot, the values in a column right of it
    label_width = 0.1 + CHAR_WIDTH_IN * max(len(label) for label in labels)
    panel_width = CHART_WIDTH_IN / n_cols
    plot_width = panel_width - label_width - VALUE_WIDTH_IN - EDGE_IN
    panel_height = ROW_HEIGHT_IN * tallest + PANEL_EXTRA_IN
    height = panel_height * n_grid_rows
    with plt.rc_context({"font.size": 8, "axes.titlesize": 8.5}):
        fig = plt.figure(figsize=(CHART_WIDTH_IN, height), dpi=100)
        try:
            for k, column in enumerate(columns):
                row, col = divmod(k, n_cols)
                top = height - row * panel_height - TITLE_IN
                bottom = height - (row + 1) * panel_height + AXIS_IN
                left = col * panel_width + label_width + EDGE_IN
                ax = fig.add_axes(
                    (left / CHART_WIDTH_IN, bottom / height, plot_width / CHART_WIDTH_IN, (top - bottom) / height)
                )
                title_x = -label_width / plot_width  # the title starts at the panel's edge, above the labels
                _chart(ax, board, column, title_chars=int(panel_width / TITLE_CHAR_IN), title_x=title_x)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=CHART_DPI, metadata={"Software": None})
        finally:
            plt.close(fig)
    return _palette_png(buf.getvalue())


def _palette_png(png: bytes) -> bytes:
    """The PNG with a palette of PALETTE_COLOURS colours: a third of the size, the same to the eye."""
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(PALETTE_COLOURS).save(out, format="PNG", optimize=True)
    return out.getvalue()


def _chart(ax, board: Leaderboard, column: ColumnKey, title_chars: int, title_x: float) -> None:
    rows = chart_rows(board, column)
    cells = [board.cells[(r, column)] for r in rows]
    seeds = [[m.value for m in board.members.get((r, column), []) if finite(m.value)] for r in rows]
    means = [c.value for c in cells]
    spreads = [c.stderr if finite(c.stderr) else 0.0 for c in cells]
    points = [v for vs in seeds for v in vs] + [m + d * s for m, s in zip(means, spreads) for d in (-1, 1)]
    ys = list(range(len(rows)))
    for y, values in zip(ys, seeds):
        if len(values) > 1:
            ax.plot(values, [y] * len(values), "o", ms=3.2, mfc="none", mec="#7f7f7f", mew=0.8, zorder=2)
    ax.errorbar(
        means, ys, xerr=spreads, fmt="o", ms=4.5, color="#225ea8", ecolor="#225ea8", elinewidth=1.4, capsize=2.5
    )
    labels, shared = _distinct_labels(rows)
    ax.set_yticks(ys, labels)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(*_axis_range(points))
    ax.grid(axis="x", color="#e4e4e4", lw=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(axis="both", length=2, pad=2)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for y, cell in zip(ys, cells):  # in a margin column right of the plot: never over a marker
        ax.annotate(
            f"{cell.value:.1f} {spread_text(cell)}",
            xy=(1, y),
            xycoords=("axes fraction", "data"),
            xytext=(5, 0),
            textcoords="offset points",
            va="center",
            fontsize=7.5,
        )
    title = benchmark_name(column, board) + (f" · {shared}" if shared else "")
    ax.set_title("\n".join(textwrap.wrap(title, title_chars)), loc="left", x=title_x, fontweight="bold")
    refs = [
        f"{r.model if r.method == 'single' else r.method} {board.cells[(r, column)].value:.1f}"
        for r in board.rows
        if r.is_reference and (r, column) in board.cells and finite(board.cells[(r, column)].value)
    ]
    note = f"{column.metric} (%)" + (f"; reference: {', '.join(refs)}" if refs else "")
    ax.set_xlabel(textwrap.shorten(note, title_chars, placeholder=" …"), fontsize=7.5, labelpad=1.5)


def charts_img(board: Leaderboard, metric: str) -> str:
    """The charts as an <img> with a data: URI (empty when there are none)."""
    png = charts_png(board, metric)
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    alt = f"{metric} per benchmark: each composition's mean, spread and seeds"
    return f'<img class=charts alt="{html.escape(alt)}" width=1260 src="data:image/png;base64,{data}">'
