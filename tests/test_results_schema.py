"""The typed, versioned results schema the runner writes and the leaderboard reads, and the model
contract the harness asks of a model (`mcomp.scoring.EvalModel`)."""

from __future__ import annotations

import json

import pytest

from mcomp.benchmarks.mcub.results import LM_EVAL_SECTIONS, RESULTS_SCHEMA, MetricRow, ResultsFile
from mcomp.benchmarks.mcub.runner import evaluate
from mcomp.benchmarks.mcub.synthetic import write_benchmark
from mcomp.benchmarks.mcub.tasks import load_task


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mcomp.commands.eval import build_tiny_model

    root = write_benchmark(tmp_path_factory.mktemp("bench"), n=2, per_modality=1)
    out = tmp_path_factory.mktemp("run")
    model = build_tiny_model("tiny:image,audio,video,point", seed=0)
    returned = evaluate(model, load_task("mcub4"), root, out, mode="loglik", model_name="tiny4")
    return out / "results.json", returned


def test_a_run_writes_the_schema_and_reads_back_whole(run):
    path, returned = run
    raw = json.loads(path.read_text())
    results = ResultsFile.read(path)
    assert results.schema == RESULTS_SCHEMA and results.to_dict() == raw == returned
    rows = {(r.subset, r.metric): r for r in results.results}
    assert set(rows) == {("MCUB-4", "accuracy"), ("MCUB-4", "accuracy_norm")}
    row = rows[("MCUB-4", "accuracy")]
    assert isinstance(row, MetricRow) and row.n_samples == 2 and row.value == pytest.approx(50.0 * row.n_correct)
    assert results.model["name"] == "tiny4" and results.prompt["media_without_placeholder"] == "ignore"


def test_readers_refuse_what_the_schema_does_not_say(run, tmp_path):
    raw = json.loads(run[0].read_text())
    cases = {
        "version": (dict(raw, schema="mcomp.eval.results/9"), r"schema 'mcomp.eval.results/9'; known: "),
        "field": (dict(raw, accuracy=1), r"unknown field\(s\) \['accuracy'\]"),
        "row value": (dict(raw, metrics=[dict(raw["metrics"][0], value="50")]), r"metrics\[0\]\.value must be"),
        "row metric": (
            dict(raw, metrics=[{k: v for k, v in raw["metrics"][0].items() if k != "metric"}]),
            r"metrics\[0\] has no 'metric' field",
        ),
        "row count": (dict(raw, metrics=[dict(raw["metrics"][0], n_samples=-1)]), r"n_samples must be a count"),
        "lm-eval view": (
            dict(
                raw,
                results={**raw["results"], "mcub4_MCUB-4": {**raw["results"]["mcub4_MCUB-4"], "accuracy,loglik": 1.0}},
            ),
            r"section 'results' does not follow from the metric rows",
        ),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=message):
            ResultsFile.read(path)


def test_the_file_follows_lm_evaluation_harness_layout(run):
    raw = json.loads(run[0].read_text())
    rows = raw["metrics"]
    version = load_task("mcub4").raw["version"]
    assert version == 1 and raw["config"]["random_seed"] == 0 and raw["config"]["model_args"] == "pretrained=tiny4"
    for row in rows:  # a subset is the task <task>_<subset>; fractions, the mode as the filter
        name = f"mcub4_{row['subset']}"
        entry = raw["results"][name]
        assert entry["alias"] == row["subset"]
        assert entry[f"{row['metric']},loglik"] == pytest.approx(row["value"] / 100)
        stderr = entry[f"{row['metric']}_stderr,loglik"]
        assert stderr == ("N/A" if row["stderr"] is None else pytest.approx(row["stderr"] / 100))
        assert raw["versions"][name] == version and raw["n-shot"][name] == 0
        assert raw["n-samples"][name] == {"original": row["n_samples"], "effective": row["n_samples"]}
        assert raw["higher_is_better"][name][row["metric"]] is True
        assert raw["configs"][name]["output_type"] == "loglikelihood"
        assert raw["configs"][name]["metadata"] == {"version": version}
    assert set(raw["results"]) == {f"mcub4_{r['subset']}" for r in rows}


def test_version_1_files_are_still_read(run, tmp_path):
    raw = json.loads(run[0].read_text())
    old = {k: v for k, v in raw.items() if k not in ("metrics", "code_versions", *LM_EVAL_SECTIONS)}
    old.update(schema="mcomp.eval.results/1", results=raw["metrics"], versions=raw["code_versions"])
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    assert ResultsFile.read(path).to_dict() == raw  # read, it is written as the current version


def test_the_harness_refuses_a_model_without_the_evaluation_api(tmp_path):
    from mcomp.scoring import EvalModel
    from mcomp.tiny import build_tiny_mllm

    class GenerateOnly:
        def generate(self, prompts, media=None, max_new_tokens=128, **kwargs):
            return ["A"] * len(prompts)

    assert isinstance(build_tiny_mllm(seed=0), EvalModel) and not isinstance(GenerateOnly(), EvalModel)
    with pytest.raises(TypeError, match=r"GenerateOnly is not an evaluation model: it needs generate, loglikelihood"):
        evaluate(GenerateOnly(), load_task("mcub4"), tmp_path, tmp_path / "out")
