"""End-to-end evaluation on tiny models and small files in the published schema: every task, both
modes, per-sample records, errors, resume after an interruption, feature cache, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mcomp.benchmarks.mcub.records import read_records
from mcomp.benchmarks.mcub.runner import evaluate
from mcomp.benchmarks.mcub.scoring import evalai_normalize
from mcomp.benchmarks.mcub.synthetic import write_benchmark
from mcomp.benchmarks.mcub.tasks import load_task
from mcomp.commands import eval as eval_cmd
from mcomp.commands.eval import build_tiny_model

TINY4 = "tiny:image,audio,video,point"
SYSTEM = "A chat between a curious user and an artificial intelligence assistant."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    names = list(load_task("modelnet40").target_params["class_names"])
    return write_benchmark(tmp_path_factory.mktemp("bench"), n=3, per_modality=2, class_names=names)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(TINY4, seed=0)


def _samples(run_dir) -> list[dict]:
    return read_records(Path(run_dir) / "samples.jsonl")


def _results(run_dir) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def _check_consistent(results: dict, records: list[dict]) -> None:
    """Metrics recomputed from the records; denominators are all samples of the subset."""
    for r in results["metrics"]:
        if r["subset"] == "mean":
            continue
        rows = [x for x in records if x["subset"] == r["subset"]]
        field = "correct" if r["metric"] == "accuracy" else "correct_norm"
        assert r["n_samples"] == len(rows)
        assert r["n_correct"] == sum(x[field] for x in rows)
        assert r["value"] == pytest.approx(100 * r["n_correct"] / len(rows))
        assert r["n_errors"] == sum(1 for x in rows if x["error"])


def test_mcub4_generate_and_loglik(bench, model, tmp_path):
    task = load_task("mcub4")
    gen = evaluate(model, task, bench, tmp_path / "gen", mode="generate", max_new_tokens=3, model_name=TINY4)
    records = _samples(tmp_path / "gen")
    assert [r["id"] for r in records] == ["mcub-4_0000", "mcub-4_0001", "mcub-4_0002"]
    answers = {
        e["id"]: e["conversations"][-1]["value"] for e in json.loads((bench / "data/test/MCUB-answer.json").read_text())
    }
    questions = json.loads((bench / "data/test/MCUB-4.json").read_text())
    for r, q in zip(records, questions):
        assert r["prompt"].startswith(SYSTEM) and r["prompt"].endswith(" ASSISTANT:")
        assert q["conversations"][0]["value"] in r["prompt"]
        assert isinstance(r["response"], str) and r["error"] is None
        assert r["target"] == answers[r["id"]]
        assert r["prediction"] == r["response"][:1] and r["correct"] == (r["prediction"] == r["target"])
    _check_consistent(gen, records)
    assert _results(tmp_path / "gen") == json.loads(json.dumps(gen))
    assert gen["max_new_tokens"] == 3 and gen["model"]["modalities"] == ["image", "audio", "video", "point"]
    assert {"torch", "transformers", "python"} <= set(gen["code_versions"]) and gen["seed"] == 0
    assert gen["data"]["questions"]["MCUB-4"]["sha256"]

    ll = evaluate(model, task, bench, tmp_path / "ll", mode="loglik", model_name=TINY4)
    records = _samples(tmp_path / "ll")
    for r in records:
        scores = r["option_scores"]
        assert [s["key"] for s in scores] == ["A", "B", "C", "D"]
        best = max(scores, key=lambda s: s["logprob"])
        assert r["prediction"] == best["key"] and r["correct"] == (best["key"] == r["target"])
        best_norm = max(scores, key=lambda s: s["logprob"] / s["num_chars"])
        assert r["prediction_norm"] == best_norm["key"]
    assert [x["metric"] for x in ll["metrics"]] == ["accuracy", "accuracy_norm"]
    _check_consistent(ll, records)


def test_mcub3_avqa_music_modelnet_end_to_end(bench, model, tmp_path, capsys):
    mcub3 = evaluate(model, load_task("mcub3"), bench, tmp_path / "m3", mode="loglik", limit=1)
    assert "mcub3 loglik: 100%" in capsys.readouterr().err  # a progress bar over the samples, left on screen
    subsets = [r["subset"] for r in mcub3["metrics"] if r["metric"] == "accuracy"]
    assert subsets == [
        "image-audio-video",
        "audio-video-pointcloud",
        "image-audio-pointcloud",
        "image-video-pointcloud",
        "mean",
    ]
    _check_consistent(mcub3, _samples(tmp_path / "m3"))
    mean = [r for r in mcub3["metrics"] if r["subset"] == "mean" and r["metric"] == "accuracy"][0]
    assert mean["value"] == pytest.approx(sum(r["value"] for r in mcub3["metrics"][:8:2]) / 4)

    avqa = evaluate(model, load_task("avqa"), bench, tmp_path / "avqa", mode="generate", limit=1, max_new_tokens=2)
    records = _samples(tmp_path / "avqa")
    assert len(records) == 7 and all(isinstance(r["id"], int) for r in records)
    _check_consistent(avqa, records)

    music = evaluate(
        model, load_task("music_avqa"), bench, tmp_path / "music", mode="generate", limit=1, max_new_tokens=3
    )
    for r in _samples(tmp_path / "music"):
        assert r["prediction"] == evalai_normalize(r["response"])
        assert r["correct"] == (r["prediction"] == evalai_normalize(r["target"]))
    _check_consistent(music, _samples(tmp_path / "music"))
    music_ll = evaluate(
        model,
        load_task("music_avqa"),
        bench,
        tmp_path / "music_ll",
        mode="loglik",
        subsets=["audio", "video+image+audio"],
        limit=1,
    )
    rec = _samples(tmp_path / "music_ll")[0]
    vocabulary = {
        evalai_normalize(e["conversations"][-1]["value"])
        for e in json.loads((bench / "data/test/music-avqa-test_mm_answer.json").read_text())
    }
    assert {evalai_normalize(s["key"]) for s in rec["option_scores"]} == vocabulary - {""}
    assert [r["subset"] for r in music_ll["metrics"]][-1] == "mean"

    mn = evaluate(model, load_task("modelnet40"), bench, tmp_path / "mn", limit=2)  # default mode: loglik
    records = _samples(tmp_path / "mn")
    annotations = {
        e["id"]: e["label_name"] for e in json.loads((bench / "data/test/modelnet40-test_mm_answer.json").read_text())
    }
    for r in records:
        assert len(r["option_scores"]) == 40 and r["option_scores"][15]["key"] == "flower pot"
        assert r["target"] == annotations[r["id"]]
        assert r["correct"] == (r["prediction"].casefold() == r["target"].casefold())
    assert mn["mode"] == "loglik"
    _check_consistent(mn, records)


def test_missing_and_unreadable_media_are_counted(bench, model, tmp_path):
    entries = json.loads((bench / "data/test/MCUB-4.json").read_text())
    entries[0]["modal_inputs"]["video"] = ["data/media/vid/none.mp4"]
    bad_png = bench / "data/media/img/truncated.png"  # inside the data root: a decode failure, not a refusal
    data = (bench / "data/media/img/0000.png").read_bytes()
    bad_png.write_bytes(data[: len(data) // 2])
    entries[2]["modal_inputs"]["vision"] = ["data/media/img/truncated.png"]
    entries.append(dict(entries[1], id="not-in-the-answer-key"))
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(entries))
    res = evaluate(model, load_task("mcub4"), bench, tmp_path / "run", mode="loglik", questions=questions)
    records = _samples(tmp_path / "run")
    assert [r["id"] for r in records] == [e["id"] for e in entries]  # nothing dropped
    assert "missing media" in records[0]["error"] and "none.mp4" in records[0]["error"]
    assert records[0]["prompt"].endswith("ASSISTANT:") and records[0]["option_scores"] is None
    assert records[1]["error"] is None
    assert "truncated.png" in records[2]["error"] and records[2]["correct"] is False
    assert records[3]["target"] is None and records[3]["error"] is None and records[3]["correct"] is False
    assert records[3]["option_scores"] == records[1]["option_scores"]  # it was scored, but counts as wrong
    acc = res["metrics"][0]
    assert acc["n_errors"] == 2 and acc["n_samples"] == 4 and acc["n_missing_answer"] == 1
    assert acc["value"] == pytest.approx(100 * records[1]["correct"] / 4)


def test_batched_contexts_give_the_same_records(bench, model, tmp_path):
    """batch_size > 1 runs several samples' contexts as one forward; a batch that meets a bad file is
    scored one sample at a time, so the records (errors included) match a one-at-a-time run."""
    entries = json.loads((bench / "data/test/MCUB-4.json").read_text())
    entries[1]["modal_inputs"]["audio"] = ["data/media/aud/none.wav"]  # missing: known before scoring
    bad_png = bench / "data/media/img/truncated.png"  # inside the data root: a decode failure, not a refusal
    data = (bench / "data/media/img/0000.png").read_bytes()
    bad_png.write_bytes(data[: len(data) // 2])
    entries[2]["modal_inputs"]["vision"] = ["data/media/img/truncated.png"]  # unreadable: fails inside the batch
    entries += [dict(e, id=f"{e['id']}-again") for e in entries]
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(entries))
    task = load_task("mcub4")
    one = evaluate(model, task, bench, tmp_path / "one", mode="loglik", questions=questions)
    many = evaluate(model, task, bench, tmp_path / "many", mode="loglik", questions=questions, batch_size=4)
    a, b = _samples(tmp_path / "one"), _samples(tmp_path / "many")
    assert [r["id"] for r in b] == [r["id"] for r in a] and len(a) == 6
    assert "none.wav" in b[1]["error"] and "truncated.png" in b[5]["error"]
    assert [bool(r["error"]) for r in b] == [False, True, True, False, True, True]
    for x, y in zip(a, b):
        assert (x["error"], x["prediction"], x["prediction_norm"]) == (
            y["error"],
            y["prediction"],
            y["prediction_norm"],
        )
        for sx, sy in zip(x["option_scores"] or [], y["option_scores"] or []):
            assert sy["logprob"] == pytest.approx(sx["logprob"], abs=1e-4, rel=1e-5)
    assert [r["value"] for r in many["metrics"]] == [r["value"] for r in one["metrics"]]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate(model, task, bench, tmp_path / "zero", mode="loglik", batch_size=0)


def test_bad_input_fails_before_any_compute(bench, model, tmp_path):
    image_only = build_tiny_model("tiny:image", seed=0)
    with pytest.raises(ValueError, match="subset 'MCUB-4' needs the 'audio' modality, but the model has only: image"):
        evaluate(image_only, load_task("mcub4"), bench, tmp_path / "a")
    with pytest.raises(ValueError, match="does not match question file"):
        evaluate(
            model, load_task("mcub4"), bench, tmp_path / "b", answers=bench / "data/test/music-avqa-test_mm_answer.json"
        )
    with pytest.raises(ValueError, match="--questions replaces one subset's file"):
        evaluate(model, load_task("mcub3"), bench, tmp_path / "c", questions=bench / "data/test/MCUB-4.json")
    with pytest.raises(FileNotFoundError, match="question file not found"):
        evaluate(model, load_task("mcub4"), tmp_path, tmp_path / "d", answers=bench / "data/test/MCUB-answer.json")
    assert not any((tmp_path / x).exists() for x in "abcd")  # no run directory, nothing computed
    # a run directory holds one evaluation: another one is refused
    evaluate(model, load_task("mcub4"), bench, tmp_path / "e", mode="loglik", limit=1)
    with pytest.raises(ValueError, match='holds different work .*mode: "loglik" there, "generate" now.*--force'):
        evaluate(model, load_task("mcub4"), bench, tmp_path / "e", mode="generate", limit=1)


def test_resume_after_an_exception_gives_identical_numbers(bench, model, tmp_path):
    task = load_task("mcub3")
    full = evaluate(model, task, bench, tmp_path / "full", mode="loglik", limit=1)

    class Stop(Exception):
        pass

    seen = []

    def stop_after_two(record):
        seen.append(record["id"])
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        evaluate(model, task, bench, tmp_path / "part", mode="loglik", limit=1, on_record=stop_after_two)
    assert len(read_records(tmp_path / "part" / "samples.part-0.jsonl")) == 2
    assert not (tmp_path / "part" / "results.json").exists()
    resumed_ids = []
    resumed = evaluate(
        model, task, bench, tmp_path / "part", mode="loglik", limit=1, on_record=lambda r: resumed_ids.append(r["id"])
    )
    assert len(resumed_ids) == 2 and not set(resumed_ids) & set(seen)  # only the missing samples ran
    assert resumed["metrics"] == full["metrics"]
    assert _samples(tmp_path / "part") == _samples(tmp_path / "full")
    assert not list((tmp_path / "part").glob("samples.part-*"))


def test_resume_after_kill(bench, model, tmp_path):
    """A CLI run killed (SIGKILL) midway, plus a torn last line, then resumed: same numbers, no duplicates."""
    n = 10
    write_benchmark(tmp_path / "data", n=n, per_modality=2, seed=1)
    args = [
        "--model",
        TINY4,
        "--task",
        "mcub4",
        "--data-root",
        str(tmp_path / "data"),
        "--mode",
        "generate",
        "--max-new-tokens",
        "4",
    ]
    run_dir = tmp_path / "killed"
    part = run_dir / "samples.part-0.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcomp.commands.eval", *args, "--out", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if part.is_file() and part.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = read_records(part)
    assert 3 <= len(done) < n
    with open(part, "ab") as f:  # a record cut off mid-write
        f.write(b'{"subset": "MCUB-4", "id": "mcub-4_00')

    ran = []  # the fixture model is the one the CLI builds for TINY4 (same seed), so it claims the CLI's identity
    resumed = evaluate(
        model,
        load_task("mcub4"),
        tmp_path / "data",
        run_dir,
        mode="generate",
        max_new_tokens=4,
        model_name=TINY4,
        on_record=lambda r: ran.append(r["id"]),
        model_identity={"tiny": TINY4, "seed": 0},
    )
    assert len(ran) == n - len(done) and not {r["id"] for r in done} & set(ran)
    reference = evaluate(
        model,
        load_task("mcub4"),
        tmp_path / "data",
        tmp_path / "ref",
        mode="generate",
        max_new_tokens=4,
        model_name=TINY4,
    )
    assert resumed["metrics"] == reference["metrics"]
    killed, ref = _samples(run_dir), _samples(tmp_path / "ref")
    assert [r["id"] for r in killed] == [r["id"] for r in ref] and len({r["id"] for r in killed}) == n
    assert killed == ref


def _cache_stats(caplog) -> dict:
    """The feature cache figures the run logged (they are not in results.json: they depend on cache warmth)."""
    logged = [r for r in caplog.records if r.name.endswith("runner") and "feature cache" in r.getMessage()]
    stats = logged[-1].args[-1]
    caplog.clear()
    return stats


def test_feature_cache_shared_across_compositions(bench, tmp_path, caplog):
    """Two models with the same encoders (different LLM and projectors): the second encodes nothing."""
    caplog.set_level("INFO", logger="mcomp.benchmarks.mcub.runner")
    first = build_tiny_model("tiny:image,video", seed=0)
    second = build_tiny_model("tiny:image,video", seed=0)
    with torch.no_grad():
        for p in list(second.llm.parameters()) + [
            p for a in second.adapters.values() for p in a.projector.parameters()
        ]:
            p.add_(0.05 * torch.randn_like(p))
    task = load_task("avqa")
    kw = dict(mode="loglik", subsets=["image", "image+video"], feature_cache=tmp_path / "features")
    evaluate(first, task, bench, tmp_path / "a", **kw)
    stats_a = _cache_stats(caplog)
    evaluate(second, task, bench, tmp_path / "b", **kw)
    stats_b = _cache_stats(caplog)
    assert stats_a["encoded"] > 0 and stats_a["disk_hits"] == 0 and stats_a["disk_misses"] == stats_a["encoded"]
    assert stats_b["encoded"] == 0 and stats_b["disk_hits"] == stats_a["encoded"]
    assert stats_a["memory_hits"] > 0  # files shared by several questions were encoded once
    assert _samples(tmp_path / "a") != _samples(tmp_path / "b")  # the compositions do differ


def test_user_task_file_with_own_function(bench, model, tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "from mcomp.benchmarks.mcub.registry import register\n"
        "@register('scorer', 'answered_anything')\n"
        "def answered_anything(value, target):\n"
        "    return value, True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mine.yaml").write_text(
        "name: mine\nfunctions: [my_scorers]\nanswers: data/test/MCUB-answer.json\n"
        "subsets:\n  - {name: four, questions: data/test/MCUB-4.json, modalities: [image, point]}\n"
        "modes:\n  generate: {scorer: answered_anything, max_new_tokens: 2}\n"
    )
    with pytest.raises(
        ValueError,
        match=r"mine\.yaml: functions lists the Python module\(s\) \['my_scorers'\].*"
        r"--allow-task-code",
    ):
        load_task(str(tmp_path / "mine.yaml"))  # a task file is data: its modules are not imported by default
    assert "my_scorers" not in sys.modules
    res = evaluate(model, load_task(str(tmp_path / "mine.yaml"), allow_code=True), bench, tmp_path / "run")
    assert res["task"] == "mine" and res["metrics"][0]["value"] == 100.0


def test_cli(bench, tmp_path, capsys):
    code = eval_cmd.main(
        [
            "--model",
            "tiny:image,audio,video,point",
            "--task",
            "mcub4",
            "--data-root",
            str(bench),
            "--mode",
            "loglik",
            "--out",
            str(tmp_path / "run"),
            "--limit",
            "2",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "mcub4 (loglik), model tiny:image,audio,video,point" in out and "accuracy_norm" in out
    assert len(_samples(tmp_path / "run")) == 2
    assert eval_cmd.main(["--model", "tiny:image", "--task", "mcub9", "--out", str(tmp_path / "x")]) == 1
    assert "unknown task 'mcub9'" in capsys.readouterr().err
    assert eval_cmd.main(["--model", str(tmp_path / "nope"), "--task", "mcub4", "--out", str(tmp_path / "x")]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert (
        eval_cmd.main(
            ["--model", "tiny:image", "--task", "mcub4", "--data-root", str(bench), "--out", str(tmp_path / "y")]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "needs the 'audio' modality" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
