"""The leaderboard page in a real browser (headless Chromium running the page's own script): the heatmap
and the table hold the numbers of the runs' results.json files, sorting and the drill-down work through
the URL hash, the page loads nothing from elsewhere, reads without JavaScript, and a 1300x900 screenshot
is written for review.

The runs are written with the schema's own writers (ResultsFile, RecordWriter): four compositions and
two reference models, three seeds each, accuracies of 80 to 100, per-sample records whose
scores make the metric rows.
"""

from __future__ import annotations

import html
import json
import logging
import os
import random
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from mcomp.benchmarks.mcub import leaderboard_page
from mcomp.benchmarks.mcub.records import RecordWriter
from mcomp.benchmarks.mcub.results import RESULTS_SCHEMA, MetricRow, ResultsFile
from mcomp.conversation import get_template

logger = logging.getLogger(__name__)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_leaderboard.sh"
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
ALL = "image+audio+video+point"
COMPOSITIONS = [(ALL, method, merge) for method in ("naivemc", "damc") for merge in ("linear", "pcb")]
REFERENCES = [("base LLM", "base", "-"), ("image model", "single", "-")]
TASKS = {
    "mcub4": ["MCUB-4"],
    "mcub3": ["image-audio-video", "audio-video-pointcloud"],
    "mcub4[image]": ["MCUB-4[image]"],
}
N_QUESTIONS = 24
KEYS = "ABCD"
WORDS = ("cube", "sphere", "red", "blue", "cone", "green", "torus", "violet")


def browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def require_browser() -> str:
    """The headless Chromium; without one the browser tests skip, except in CI (CI set), where
    scripts/setup.sh installs it and a skip would hide that the page went untested."""
    found = browser()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("no headless Chromium in CI: scripts/setup.sh installs chromium-headless-shell")
        pytest.skip("no headless Chromium (Debian: apt-get install -y chromium-headless-shell)")
    return found


def question(subset: str, k: int) -> tuple[str, list[str], str]:
    """A question's human turn, its options and its answer key (fixed by subset and number)."""
    pick = random.Random(f"{subset}-{k}")
    options = pick.sample(WORDS, 4)
    placeholders = "image: <image>\n" if "image" in subset or subset == "MCUB-4" else ""
    lines = [f"{key}. {text}" for key, text in zip(KEYS, options)]
    turn = f"{placeholders}audio: <audio>\nWhat do the inputs of question {k} have in common?\n" + "\n".join(lines)
    return turn + "\nAnswer with the option's text.", options, KEYS[k % 4]


def write_run(run_dir: Path, row: tuple[str, str, str], task: str, seed: int, skill: float) -> None:
    """One run: records answering each question right with probability `skill`, and the metric rows
    (and a task's mean over several subsets) they make."""
    model, method, merge = row
    template = get_template("vicuna_v1")
    pick = random.Random(f"{row}-{task}-{seed}")
    run_dir.mkdir(parents=True)
    rows, per_subset = [], {}
    with RecordWriter(run_dir / "samples.jsonl") as writer:
        for subset in TASKS[task]:
            correct = {"accuracy": 0, "accuracy_norm": 0}
            for k in range(N_QUESTIONS):
                turn, options, answer = question(subset, k)
                prediction = answer if pick.random() < skill else pick.choice([x for x in KEYS if x != answer])
                prediction_norm = answer if pick.random() < skill else prediction
                correct["accuracy"] += prediction == answer
                correct["accuracy_norm"] += prediction_norm == answer
                writer.write(
                    {
                        "subset": subset,
                        "id": f"{subset}-{k:04d}",
                        "index": k,
                        "mode": "loglik",
                        "prompt": template.render([("human", turn), ("gpt", None)]),
                        "target": answer,
                        "prediction": prediction,
                        "correct": prediction == answer,
                        "prediction_norm": prediction_norm,
                        "correct_norm": prediction_norm == answer,
                        "error": None,
                        "media_ignored": False,
                        "option_scores": [
                            {"key": key, "continuation": text, "logprob": -1.0, "num_tokens": 1, "num_chars": len(text)}
                            for key, text in zip(KEYS, options)
                        ],
                    }
                )
            per_subset[subset] = correct
    for metric in ("accuracy", "accuracy_norm"):
        values = {s: 100 * c[metric] / N_QUESTIONS for s, c in per_subset.items()}
        for subset, value in values.items():
            rows.append(MetricRow(task, subset, "loglik", metric, value, 1.5, N_QUESTIONS, per_subset[subset][metric]))
        if len(values) > 1:
            mean = statistics.mean(values.values())
            rows.append(MetricRow(task, "mean", "loglik", metric, mean, 1.0, N_QUESTIONS * len(values)))
    modalities = ["image"] if method == "single" else ALL.split("+")
    results = ResultsFile(
        schema=RESULTS_SCHEMA,
        results=tuple(rows),
        task=task,
        mode="loglik",
        model={"name": model, "modalities": modalities},
        provenance={"composition": {"method": method, "merge": merge}},
        prompt={"template": "vicuna_v1"},
        seed=0,
    )
    (run_dir / "results.json").write_text(json.dumps(results.to_dict(), indent=1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("page-runs")
    dirs = []
    for k, row in enumerate(COMPOSITIONS + REFERENCES):
        tasks = ["mcub4[image]"] if row[1] == "single" else ["mcub4", "mcub3"]
        for task in tasks:
            for seed in range(3):
                skill = 0.65 if row[1] == "base" else 0.8 + 0.05 * k
                run_dir = root / f"{'-'.join(row)}-{task}-s{seed}".replace(" ", "_").replace("+", "_")
                write_run(run_dir, row, task, seed, skill)
                dirs.append(run_dir)
    return dirs


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory) -> Path:
    return leaderboard_page.write(runs, tmp_path_factory.mktemp("board"), title="MCUB page test")["html"]


def expected_cells(runs: list[Path]) -> dict[tuple, tuple[float, float]]:
    """(model, method, backend, task, subset, mode, metric) -> (mean, sample std) over the runs' results.json."""
    values: dict[tuple, list[float]] = {}
    for run in runs:
        data = json.loads((run / "results.json").read_text())
        composition = data["provenance"]["composition"]
        for m in data["metrics"]:
            key = (data["model"]["name"], composition["method"], composition["merge"], m["task"], m["subset"])
            values.setdefault(key + (m["mode"], m["metric"]), []).append(m["value"])
    return {k: (statistics.mean(v), statistics.stdev(v)) for k, v in values.items()}


def dump_dom(page: Path, state: str = "") -> str:
    """The page's DOM after its script ran on `page#state`, as Chromium serializes it."""
    found = require_browser()
    url = page.resolve().as_uri() + (f"#{state}" if state else "")
    out = subprocess.run(
        [found, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "<html" in out.stdout, out.stderr[-2000:]
    return out.stdout


def text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def section(dom: str, start: str, end: str) -> str:
    i = dom.index(start)
    return dom[i : dom.index(end, i)]


def table_ids(dom: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Row id -> (model, method, backend) and column id -> (task, subset, mode, metric), read from the table."""
    rows = {
        rid: tuple(html.unescape(x) for x in rest)
        for rid, *rest in re.findall(
            r'<tr data-row="(r\d+)" data-model="([^"]*)" data-method="([^"]*)" '
            r'data-backend="([^"]*)"',
            dom,
        )
    }
    cols = {}
    for cid, title in re.findall(r'<th data-col="(c\d+)" data-metric="[^"]*" title="([^"]*)"', dom):
        task, subset, mode, metric = re.fullmatch(r"(.*) / (.*) \((.*), (.*)\)", html.unescape(title)).groups()
        cols[cid] = (task, subset, mode, metric)
    return rows, cols


def table_rows(dom: str, body: str) -> list[str]:
    table = section(dom, 'id="board-table"', "</table>")
    return re.findall(r'<tr data-row="(r\d+)"', section(table, f'<tbody class="{body}">', "</tbody>"))


def test_heatmap_and_table_hold_the_results(runs, page):
    dom = dump_dom(page)
    rows, cols = table_ids(dom)
    expected = expected_cells(runs)
    assert len(rows) == len(COMPOSITIONS) + len(REFERENCES) and len(cols) == 2 * 5
    # the table: every metric of every row, to the sixth decimal, with its spread across seeds
    table = section(dom, 'id="board-table"', "</table>")
    found = re.findall(
        r'<td data-col="(c\d+)" data-metric="[^"]*" data-row="(r\d+)" data-v="([^"]+)"[^>]*>(.*?)</td>', table
    )
    assert len(found) == len(expected)
    for cid, rid, value, content in found:
        mean, spread = expected[rows[rid] + cols[cid]]
        assert float(value) == pytest.approx(mean, abs=1e-6)
        assert text(content).startswith(f"{mean:.2f} ±{spread:.2f}")
    # the heatmap of the first metric: MCUB-4 columns first, mean ± spread to one decimal
    heat = section(dom, 'class="heat" data-metric="accuracy"', "</table>")
    heat_cols = re.findall(r'<th data-col="(c\d+)"', heat)
    assert [cols[c][0] for c in heat_cols] == ["mcub4", "mcub4[image]", "mcub3", "mcub3", "mcub3"]
    cells = re.findall(r'<td class="v" data-row="(r\d+)" data-col="(c\d+)"[^>]*>(.*?)</td>', heat)
    assert len(cells) == sum(1 for k in expected if k[-1] == "accuracy")
    for rid, cid, content in cells:
        mean, spread = expected[rows[rid] + cols[cid]]
        assert text(content).rstrip("★") == f"{mean:.1f}±{spread:.1f}"
    # compositions above the divider, references below it
    comp = section(heat, 'class="comp"', "</tbody>")
    ref = section(heat, 'class="ref"', "</tbody>")
    assert {rows[r] for r in re.findall(r'<tr data-row="(r\d+)"', comp)} == set(COMPOSITIONS)
    assert {rows[r][1] for r in re.findall(r'<tr data-row="(r\d+)"', ref)} == {"base", "single"}
    # the best mean of each column is marked, and only it (a column of one row has none to beat)
    for cid in heat_cols:
        column = {k: v[0] for k, v in expected.items() if k[3:] == cols[cid]}
        marked = {rows[r] + cols[c] for r, c, content in cells if c == cid and "★" in content}
        best = {k for k, v in column.items() if v == max(column.values())} if len(column) > 1 else set()
        assert marked == best


def test_sorting_and_filtering_through_the_hash(runs, page):
    dom = dump_dom(page)
    rows, cols = table_ids(dom)
    expected = expected_cells(runs)
    by_key = {v: k for k, v in cols.items()}
    column = by_key[("mcub3", "mean", "loglik", "accuracy")]
    original = table_rows(dom, "comp")
    for direction in ("desc", "asc"):
        sorted_dom = dump_dom(page, f"sort={column}:{direction}")
        means = {r: expected[rows[r] + cols[column]][0] for r in original}
        want = sorted(original, key=lambda r: means[r] * (-1 if direction == "desc" else 1))
        assert table_rows(sorted_dom, "comp") == want
        assert want != original or direction == "asc"
        assert f'data-col="{column}" data-metric="accuracy" title=' in sorted_dom
    filtered = dump_dom(page, "method=damc&backend=pcb")
    table = section(filtered, 'id="board-table"', "</table>")
    visible = [m.group(1) for m in re.finditer(r'<tr data-row="(r\d+)"([^>]*)>', table) if "hidden" not in m.group(2)]
    assert [rows[r] for r in visible] == [(ALL, "damc", "pcb")]


def test_drill_down_shows_the_runs_samples_and_the_differences(runs, page):
    dom = dump_dom(page)
    rows, cols = table_ids(dom)
    ids = {v: k for k, v in rows.items()}
    col = {v: k for k, v in cols.items()}[("mcub4", "MCUB-4", "loglik", "accuracy")]
    a, b = ids[(ALL, "naivemc", "linear")], ids[(ALL, "damc", "pcb")]
    drilled = dump_dom(page, f"drill={a}:{col}&vs={b}")
    panel = section(drilled, 'id="drill"', "</section>")
    a_runs = sorted(r for r in runs if r.name.startswith(f"{ALL}-naivemc-linear-mcub4-".replace("+", "_")))
    b_runs = sorted(r for r in runs if r.name.startswith(f"{ALL}-damc-pcb-mcub4-".replace("+", "_")))
    assert len(a_runs) == 3 and all(r.name in panel for r in a_runs)
    records = [[json.loads(line) for line in (r / "samples.jsonl").read_text().splitlines()] for r in a_runs]
    # a real sample: its question, the answer and each run's prediction, as samples.jsonl has them
    samples = panel[panel.rindex('<table class="samples"') :]  # the last table: every question of the cell
    first = records[0][5]
    _, options, _ = question("MCUB-4", 5)
    row = re.search(r'<tr class="sample" data-q="\d+"><td>6</td>(.*?)</tr>', samples, flags=re.S)
    cells = [text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), flags=re.S)]
    assert cells[0] == f"{first['subset']} · {first['id']}"
    assert "What do the inputs of question 5 have in common?" in cells[1] and "image: <image>" in cells[1]
    assert cells[2] == f"{first['target']}. {options[KEYS.index(first['target'])]}"
    for k, run_records in enumerate(records):
        prediction = run_records[5]["prediction"]
        mark = "✓" if run_records[5]["correct"] else "✗"
        assert cells[3 + k] == f"{mark} {prediction}. {options[KEYS.index(prediction)]}"
    # the comparison: questions whose most common answer across seeds differs between the two rows
    b_records = [[json.loads(line) for line in (r / "samples.jsonl").read_text().splitlines()] for r in b_runs]

    def majority(answers: list[str]) -> str:
        return max(answers, key=lambda x: (answers.count(x), -answers.index(x)))

    differ = [
        k
        for k in range(N_QUESTIONS)
        if majority([r[k]["prediction"] for r in records]) != majority([r[k]["prediction"] for r in b_records])
    ]
    assert differ, "the fixture's compositions should disagree somewhere"
    compare = section(panel, '<h3 id="compare">', "</table>")
    assert text(compare).startswith(f"{len(differ)} of {N_QUESTIONS} questions answered differently")
    listed = [int(n) for n in re.findall(r'<tr class="sample" data-q="\d+"><td>(\d+)</td>', compare)]
    assert listed == [k + 1 for k in differ]


def test_page_is_self_contained_and_reads_without_javascript(page):
    source = page.read_text()
    assert not re.search(r"""(src|href|action|poster|data)\s*=\s*["']?(https?:)?//""", source, flags=re.I)
    assert not re.search(r"<link\b|<script[^>]+src=|@import|url\(\s*['\"]?(https?:)?//", source, flags=re.I)
    assert not re.search(r"<(iframe|embed|object)\b", source, flags=re.I)
    # without the script, what shows is the file as written: the overview (heatmap and charts) and the table
    static = source[: source.index("<script")]
    assert '<table class=heat data-metric="accuracy">' in static and 'src="data:image/png;base64,' in static
    assert len(re.findall(r"<tr data-row=r\d+ data-model=", static)) == len(COMPOSITIONS) + len(REFERENCES)
    assert "<noscript>" in static and "<section id=drill hidden>" in static


def test_same_runs_give_the_same_bytes(runs, page, tmp_path):
    again = leaderboard_page.write(list(reversed(runs)), tmp_path, title="MCUB page test")["html"]
    assert again.read_bytes() == page.read_bytes()


def test_screenshot_at_1300x900(page, tmp_path):
    require_browser()
    shot = tmp_path / "leaderboard-1300x900.png"
    out = subprocess.run(["bash", str(SCRIPT), str(page), str(shot)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    logger.warning("leaderboard screenshot for review: %s", shot)
    print(f"leaderboard screenshot for review: {shot}")
    img = Image.open(shot).convert("L")
    assert img.size == (1300, 900)
    lo, hi = img.getextrema()
    assert lo < 80 and hi > 200 and sum(img.histogram()[:128]) > 5000  # text, heatmap and charts drawn
