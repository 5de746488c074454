"""`mcomp leaderboard`: Markdown table and the self-contained HTML page, from real runs (the page in a browser,
sorting and drill-down included: test_mcub_leaderboard_page.py)."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from mcomp.benchmarks.mcub import leaderboard, leaderboard_page
from mcomp.benchmarks.mcub.runner import evaluate
from mcomp.benchmarks.mcub.synthetic import write_benchmark
from mcomp.benchmarks.mcub.tasks import load_task
from mcomp.commands import leaderboard as leaderboard_cmd
from mcomp.commands.eval import build_tiny_model
from tests.test_mcub_leaderboard_page import require_browser

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_leaderboard.sh"
COMPOSITIONS = [
    ({"method": "naive_mc", "merge_backend": "sum"}, 0),
    ({"method": "damc", "merge_backend": "pcb"}, 1),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two compositions x (MCUB-4 loglik, MCUB-3 loglik), tiny models, 3 samples per subset."""
    tmp = tmp_path_factory.mktemp("runs")
    root = write_benchmark(tmp / "data", n=3, per_modality=2)
    dirs = []
    for provenance, seed in COMPOSITIONS:
        model = build_tiny_model("tiny:image,audio,video,point", seed=seed)
        model.provenance = dict(provenance)
        for task in ("mcub4", "mcub3"):
            run_dir = tmp / f"{provenance['method']}-{task}"
            evaluate(
                model,
                load_task(task),
                root,
                run_dir,
                mode="loglik",
                limit=3 if task == "mcub4" else 1,
                model_name="tiny-vicuna",
            )
            dirs.append(run_dir)
    return dirs


def test_markdown_and_html(runs, tmp_path):
    paths = leaderboard_page.write(runs, tmp_path / "board", title="MCUB (tiny)")
    md = paths["markdown"].read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["model", "method", "merge backend"]
    assert "mcub4 / MCUB-4 (loglik, accuracy)" in header and "mcub3 / mean (loglik, accuracy_norm)" in header
    assert len(header) == 3 + 2 + 5 * 2  # mcub4: 1 subset; mcub3: 4 subsets + mean; 2 metrics each
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert sorted(r[:3] for r in rows) == [["tiny-vicuna", "damc", "pcb"], ["tiny-vicuna", "naive_mc", "sum"]]
    col = header.index("mcub4 / MCUB-4 (loglik, accuracy)")
    for row in rows:
        method_dir = [d for d in runs if d.name == f"{row[1]}-mcub4"][0]
        result = json.loads((method_dir / "results.json").read_text())["metrics"][0]
        assert row[col] == f"{result['value']:.2f} ± {result['stderr']:.2f}"

    page = paths["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "MCUB (tiny)" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing to fetch: opens from disk
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # the per-benchmark charts of each metric (accuracy, accuracy_norm), one image each
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "PNG" and img.width > 1000
    assert "naive_mc" in page and "damc" in page
    # the table holds every metric column, the heatmaps one column per benchmark of each metric
    assert len(re.findall(r"<th data-col=c\d+ data-metric=", page)) == len(header) - 3
    assert len(re.findall(r"<table class=heat ", page)) == 2
    assert page.index("mcub4 / MCUB-4 (loglik, accuracy)") < page.index("mcub3 / mean (loglik, accuracy)")


def test_bad_run_dirs(runs, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        leaderboard.build([tmp_path])
    (tmp_path / "results.json").write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="not an mcomp eval results file"):
        leaderboard.build([tmp_path])
    assert leaderboard_cmd.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "no results.json" in capsys.readouterr().err
    assert leaderboard_cmd.main([*map(str, runs), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "index.html").is_file() and (tmp_path / "o" / "leaderboard.md").is_file()


def test_page_renders_in_headless_chromium(runs, tmp_path):
    require_browser()
    paths = leaderboard_page.write(runs, tmp_path / "board")
    shot = tmp_path / "shot.png"
    out = subprocess.run(
        ["bash", str(SCRIPT), str(paths["html"]), str(shot), "1200,1400"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 1400)
    top = img.crop((0, 0, 1200, 700))
    lo, hi = top.getextrema()
    assert lo < 80 and hi > 200  # text and charts drawn on the white page, not a blank or error page
    dark = sum(top.histogram()[:128])
    assert dark > 2000


def test_runs_of_one_cell_are_averaged_with_their_spread(tmp_path):
    """Seeds of one row and column: mean and sample std across runs (statistics module as reference)."""
    import json
    import statistics

    from mcomp.benchmarks.mcub import leaderboard as lb
    from mcomp.benchmarks.mcub.results import RESULTS_SCHEMA_V1

    values = [40.0, 55.0, 61.0]
    runs = []
    for k, v in enumerate(values):
        run = tmp_path / f"seed{k}"
        run.mkdir()
        (run / "results.json").write_text(
            json.dumps(
                {
                    "schema": RESULTS_SCHEMA_V1,  # the version-1 layout: rows under "results"
                    "provenance": {"composition": {"method": "damc", "merge": "pcb"}},
                    "model": {"name": "pair"},
                    "results": [
                        {
                            "task": "mcub4",
                            "subset": "MCUB-4",
                            "mode": "loglik",
                            "metric": "accuracy",
                            "value": v,
                            "stderr": 3.0,
                            "n_samples": 10,
                        }
                    ],
                }
            )
        )
        runs.append(run)
    board = lb.build(runs)
    (row,) = board.rows
    assert (row.method, row.backend) == ("damc", "pcb")
    cell = board.cells[(row, board.columns[0])]
    assert cell.n_runs == 3 and cell.n_samples == 30
    assert cell.value == pytest.approx(statistics.mean(values))
    assert cell.stderr == pytest.approx(statistics.stdev(values))
    assert "(n=3)" in lb.to_markdown(board)
