"""No silent wrong results from `mcomp eval`: a run directory resumes only the same work (a model
folder rebuilt under the same name is refused; --force starts afresh), a run killed with SIGKILL and
resumed gives the uninterrupted run's bytes at batch size 4, results.json is byte-reproducible, and
feature cache entries are checked against their key (corrupt, foreign or other-version entries are
recomputed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from mcomp.benchmarks.mcub.records import read_records
from mcomp.benchmarks.mcub.runner import evaluate
from mcomp.benchmarks.mcub.synthetic import write_benchmark
from mcomp.benchmarks.mcub.tasks import load_task
from mcomp.commands import eval as eval_cmd
from mcomp.commands.eval import build_tiny_model

TINY4 = "tiny:image,audio,video,point"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("bench"), n=3, per_modality=2)


def _bytes(run_dir: Path) -> tuple[bytes, bytes]:
    return (run_dir / "samples.jsonl").read_bytes(), (run_dir / "results.json").read_bytes()


def _save_tiny(path: Path, seed: int, overwrite: bool = False) -> None:
    model = build_tiny_model(TINY4, seed=seed)
    model.provenance = {"built_for_test": {"seed": seed}}
    model.save_pretrained(path, overwrite=overwrite)


def test_rebuilt_model_folder_is_refused_and_force_starts_afresh(bench, tmp_path, capsys):
    model_dir, run_dir = tmp_path / "model", tmp_path / "run"
    _save_tiny(model_dir, seed=0)
    args = ["--model", str(model_dir), "--task", "mcub4", "--data-root", str(bench), "--mode", "loglik", "--limit", "2"]
    assert eval_cmd.main([*args, "--out", str(run_dir)]) == 0
    capsys.readouterr()
    old_records, old_identity = _bytes(run_dir), (run_dir / "run.json").read_bytes()
    (run_dir / "notes.txt").write_text("kept\n")

    _save_tiny(model_dir, seed=1, overwrite=True)  # same folder name, another model
    assert eval_cmd.main([*args, "--out", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "holds different work" in err and "model.directory_sha256:" in err and "--force" in err
    assert "task_config" not in err and "questions_sha256" not in err  # only what changed is named
    assert _bytes(run_dir) == old_records and (run_dir / "run.json").read_bytes() == old_identity  # untouched

    assert eval_cmd.main([*args, "--out", str(run_dir), "--force"]) == 0
    assert eval_cmd.main([*args, "--out", str(tmp_path / "fresh")]) == 0
    assert _bytes(run_dir) == _bytes(tmp_path / "fresh")  # the new model's records and provenance, nothing old
    assert _bytes(run_dir)[0] != old_records[0]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["provenance"] == {"built_for_test": {"seed": 1}}
    assert (run_dir / "notes.txt").read_text() == "kept\n"  # --force removes only the run's own files
    identity = json.loads((run_dir / "run.json").read_text())
    assert identity == json.loads((tmp_path / "fresh" / "run.json").read_text())
    assert identity["batch_size"] == 1 and identity["mode"] == "loglik" and identity["limit"] == 2
    assert {"mcomp", "torch"} <= set(identity["code"])

    # other settings that change the records are refused too, each named
    assert eval_cmd.main([*args[:-1], "1", "--out", str(run_dir)]) == 1
    assert "limit: 2 there, 1 now" in capsys.readouterr().err
    assert eval_cmd.main([*args, "--batch-size", "2", "--out", str(run_dir)]) == 1
    assert "batch_size: 1 there, 2 now" in capsys.readouterr().err


def test_killed_batched_run_resumes_to_the_uninterrupted_bytes(tmp_path, monkeypatch):
    """kill -9 after the third record of a --batch-size 4 run (inside the first batch), then the same
    command again: the first batch runs whole (writing only its last record), and samples.jsonl and
    results.json equal an uninterrupted run's, byte for byte; a second uninterrupted run does too."""
    n = 10
    data = write_benchmark(tmp_path / "data", n=n, per_modality=2, seed=1)
    args = ["--model", TINY4, "--task", "mcub4", "--data-root", str(data), "--mode", "loglik", "--batch-size", "4"]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MCOMP_FAULT": "eval.record@3"}
    out = subprocess.run(
        [sys.executable, "-m", "mcomp.commands.eval", *args, "--out", str(killed)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    part = read_records(killed / "samples.part-0.jsonl")
    assert [r["id"] for r in part] == ["mcub-4_0000", "mcub-4_0001", "mcub-4_0002"]
    assert not (killed / "samples.jsonl").exists() and not (killed / "results.json").exists()

    monkeypatch.delenv("MCOMP_FAULT", raising=False)
    assert eval_cmd.main([*args, "--out", str(killed)]) == 0
    assert eval_cmd.main([*args, "--out", str(tmp_path / "straight")]) == 0
    assert eval_cmd.main([*args, "--out", str(tmp_path / "again")]) == 0
    assert _bytes(killed) == _bytes(tmp_path / "straight") == _bytes(tmp_path / "again")
    assert len(read_records(killed / "samples.jsonl")) == n and not list(killed.glob("samples.part-*"))
    results = json.loads((killed / "results.json").read_text())
    assert set(results["run"]) == {"world_size", "feature_cache_dir"}  # nothing from the clock


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.rglob("*.safetensors"))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mcomp.feature_cache" and r.levelname == "WARNING"]


def _stats(caplog) -> dict:
    logged = [r for r in caplog.records if r.name.endswith("runner") and "feature cache" in r.getMessage()]
    return logged[-1].args[-1]


def test_feature_cache_entries_are_checked_against_their_key(bench, tmp_path, caplog):
    caplog.set_level("INFO")
    model = build_tiny_model(TINY4, seed=0)
    task, cache = load_task("mcub4"), tmp_path / "features"
    kw = dict(mode="loglik", limit=1, feature_cache=cache, model_name=TINY4)
    evaluate(model, task, bench, tmp_path / "cold", **kw)
    entries = _entries(cache)
    assert len(entries) == 4  # one file per modality
    with safe_open(str(entries[0]), framework="pt") as f:
        meta = f.metadata()
    assert {"encoder", "media_sha256", "mcomp", "torch"} <= set(meta)
    assert entries[0].parent.parent.name == meta["encoder"]

    corrupt, foreign = entries[0], entries[1]
    corrupt.write_bytes(b"not a safetensors file")
    foreign.write_bytes(entries[2].read_bytes())  # a valid entry, but another input's
    caplog.clear()
    evaluate(model, task, bench, tmp_path / "checked", **kw)
    warned = _warnings(caplog)
    assert len(warned) == 2
    assert any(str(corrupt) in w and "unreadable" in w for w in warned)
    assert any(str(foreign) in w and "media_sha256" in w for w in warned)
    stats = _stats(caplog)
    assert stats["disk_rejected"] == 2 and stats["encoded"] == 2 and stats["disk_hits"] == 2
    assert _bytes(tmp_path / "checked")[0] == _bytes(tmp_path / "cold")[0]  # recomputed, not misused
    for path in (corrupt, foreign):  # rewritten under their own key
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["encoder"] == path.parent.parent.name
    caplog.clear()
    evaluate(model, task, bench, tmp_path / "warm", **kw)
    assert not _warnings(caplog) and _stats(caplog)["disk_hits"] == 4


def test_feature_cache_entries_of_other_code_versions_are_not_reused(bench, tmp_path, caplog, monkeypatch):
    import mcomp.feature_cache as fc

    caplog.set_level("INFO")
    model = build_tiny_model(TINY4, seed=0)
    task, cache = load_task("mcub4"), tmp_path / "features"
    kw = dict(mode="loglik", limit=1, feature_cache=cache, model_name=TINY4)
    real = fc.code_versions()
    monkeypatch.setattr(fc, "code_versions", lambda: {**real, "mcomp": "0.0.1-other", "torch": "1.0-other"})
    evaluate(model, task, bench, tmp_path / "other", **kw)
    other_entries = _entries(cache)
    assert len(other_entries) == 4
    monkeypatch.undo()

    caplog.clear()
    evaluate(model, task, bench, tmp_path / "now", **kw)
    stats = _stats(caplog)
    assert stats["disk_hits"] == 0 and stats["encoded"] == 4  # another key: nothing reused
    now_entries = sorted(set(_entries(cache)) - set(other_entries))
    assert len(now_entries) == 4

    # an other-version entry put at this version's path is caught by its metadata
    target = now_entries[0]
    source = next(p for p in other_entries if _metadata(p)["media_sha256"] == _metadata(target)["media_sha256"])
    assert _metadata(source)["mcomp"] == "0.0.1-other"
    target.write_bytes(source.read_bytes())  # same encoder and input, other code
    caplog.clear()
    evaluate(model, task, bench, tmp_path / "again", **kw)
    warned = _warnings(caplog)
    assert len(warned) == 1 and str(target) in warned[0] and "0.0.1-other" in warned[0]
    assert _stats(caplog)["disk_rejected"] == 1
    assert _bytes(tmp_path / "again")[0] == _bytes(tmp_path / "now")[0]


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()
