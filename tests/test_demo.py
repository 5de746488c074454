"""The embedded default end to end at the reduced size: world -> zoo -> compositions -> MCUB -> table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

import mcomp
from mcomp.conversation import get_template
from mcomp.fingerprint import IdentityMismatch
from mcomp.modalities import ORDER as MODALITIES
from mcomp.zoo import build_zoo
from mcomp.zoo.build import ZooSettings, default_root, recipe_digest
from mcomp.zoo.demo import run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo("test", 0, tmp_path_factory.mktemp("zoo"), workers=2)


def test_zoo_holds_every_model_and_reuses_its_cache(zoo):
    for m in MODALITIES:
        assert zoo.encoder(m).is_file()
        for flavour in ("stage1", "naivemc", "damc"):
            assert (zoo.model(m, flavour, 0) / "mcomp_config.json").is_file()
    for name in ("audio-s0-stage1", "audio-s0-damc"):  # the modality models train in their own batch size
        state = json.loads(next((zoo.root / "checkpoints" / name).glob("step-*/trainer_state.json")).read_text())
        assert state["config"]["batch_size"] == zoo.settings.model_batch_size == 4
    for m in MODALITIES:  # stage 2 runs the modality's own step count
        state = json.loads(
            next((zoo.root / "checkpoints" / f"{m}-s0-naivemc").glob("step-*/trainer_state.json")).read_text()
        )
        assert (
            state["config"]["max_steps"] == zoo.settings.steps_of_stage2(m) == (16 if m in ("image", "video") else 15)
        )
    damc = mcomp.load(zoo.model("audio", "damc", 0))
    assert damc.lora_adapters == ["text", "audio"] and "audio" in damc.prefix_tokens
    assert damc.adapters["audio"].config.checkpoint == str(zoo.encoder("audio"))  # the pretrained, frozen encoder
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    pieces = tokenizer.tokenize(get_template("vicuna_v1").prompt("x"))
    assert len(pieces) < 40 and "▁assistant." in pieces  # the system prompt in words, not ~100 pieces
    before = (zoo.root / "zoo.json").stat().st_mtime_ns
    assert build_zoo("test", 0, zoo.root).root == zoo.root
    assert (zoo.root / "zoo.json").stat().st_mtime_ns == before  # cached: nothing rebuilt


def test_zoo_cache_key_follows_the_recipe(zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("MCOMP_CACHE", str(tmp_path))
    settings = ZooSettings.for_size("test")
    assert default_root("test", 0).name == f"v{zoo.manifest['version']}-test-seed0-{recipe_digest(settings)}"
    assert zoo.manifest["recipe"] == recipe_digest(settings)
    changed = ZooSettings.for_size("test")
    changed.stage1_steps += 1
    assert recipe_digest(changed) != recipe_digest(settings)
    described = ZooSettings.for_size("test")
    described.build_minutes = 99  # what a build is announced to take is not what it builds
    assert recipe_digest(described) == recipe_digest(settings)
    # a folder holding a zoo of another recipe is refused, not reused, and left as it was
    other = tmp_path / "other"
    other.mkdir()
    (other / "zoo.json").write_text(json.dumps({**zoo.manifest, "recipe": recipe_digest(changed)}))
    with pytest.raises(ValueError, match="zoo.json: this zoo was built from another recipe"):
        build_zoo("test", 0, other)
    assert sorted(p.name for p in other.iterdir()) == ["zoo.json"]


def test_zoo_build_killed_then_rerun_equals_an_uninterrupted_build(zoo, tmp_path):
    """A worker killed (SIGKILL) right after its second step is committed; the rerun reuses what
    was committed and rebuilds the rest: every weight file equals the uninterrupted build's."""
    root = tmp_path / "zoo"
    cmd = [sys.executable, "-m", "mcomp", "zoo", "build", "--size", "test", "--root", str(root), "--workers", "2"]
    env = {k: v for k, v in os.environ.items() if k != "MCOMP_FAULT"}
    killed = subprocess.run(cmd, env={**env, "MCOMP_FAULT": "zoo.step_done@2"}, capture_output=True, text=True)
    assert killed.returncode != 0 and "terminated abruptly" in killed.stderr
    assert not (root / "zoo.json").exists()
    committed = {p: p.stat().st_mtime_ns for p in (root / "encoders").glob("*.safetensors")}
    assert committed
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in committed.items())  # reused, not rebuilt
    weights = sorted(
        r
        for r in (p.relative_to(zoo.root) for p in zoo.root.rglob("*.safetensors"))
        if r.parts[0] in ("base", "encoders", "models")
    )
    assert len({r.parts[1] for r in weights if r.parts[0] == "models"}) == 12 and len(weights) > 17
    for rel in weights:
        assert (root / rel).read_bytes() == (zoo.root / rel).read_bytes(), rel


def test_zoo_steps_of_other_work_are_refused(zoo, tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(zoo.root, copy, ignore=shutil.ignore_patterns("evals", "features", "checkpoints"))
    step = json.loads((copy / "base" / "zoo_step.json").read_text())
    (copy / "base" / "zoo_step.json").write_text(json.dumps({**step, "code": {**step["code"], "torch": "1.0"}}))
    with pytest.raises(IdentityMismatch, match=r"base holds different work \(code.torch: \"1.0\" there"):
        build_zoo("test", 0, copy)
    (copy / "notes.txt").write_text("mine")  # --force deletes only a folder that holds nothing but a zoo
    with pytest.raises(FileExistsError, match="notes.txt"):
        build_zoo("test", 0, copy, force=True)
    assert (copy / "notes.txt").is_file() and (copy / "base").is_dir()


def test_zoo_settings_refuse_a_modality_without_a_step_count():
    settings = ZooSettings.from_dict({"stage2_steps": {"image": 5}, "encoder_steps": 7})
    assert settings.steps_of_stage2("image") == 5 and settings.steps_of_encoder("audio") == 7
    with pytest.raises(ValueError, match="no step count for modality 'audio'"):
        settings.steps_of_stage2("audio")


def test_reduced_demo_runs_to_the_table(zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output directory, as the README's main command passes
    summary = run_demo(
        "test",
        0,
        "demo",
        root=zoo.root,
        combos={"image+audio+video+point": MODALITIES},
        merges={"linear": {}, "pcb": {"ratio": 0.5}},
    )
    table = (tmp_path / "demo" / "demo.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    labels = {tuple(c.strip() for c in ln.strip("|").split("|")[:3]) for ln in rows}
    assert ("base LLM + stage-1 projectors", "base", "-") in labels
    assert {("image+audio+video+point", m, b) for m in ("naivemc", "damc") for b in ("linear", "pcb")} <= labels
    assert {(f"{m} model (own modality)", "single", "-") for m in MODALITIES} <= labels
    assert (tmp_path / "demo" / "index.html").read_text().count("<img") >= 1
    record = json.loads(
        next((tmp_path / "demo" / "runs").glob("image_audio_video_point-damc-pcb-s0-mcub4/samples.jsonl"))
        .read_text()
        .splitlines()[0]
    )
    assert record["error"] is None and len(record["option_scores"]) == 4
    # the world's cloze formulation: options scored by their text, predicted by their letter
    assert [o["key"] for o in record["option_scores"]] == list("ABCD")
    assert all(len(o["continuation"]) > 1 and o["continuation"][0] != " " for o in record["option_scores"])
    held = summary["held_out_accuracy"]
    assert set(held) == {f"{m}-s0" for m in MODALITIES}
    for figures in held.values():  # the overall accuracy is the by-kind accuracies weighted by their counts
        for flavour in ("naivemc", "damc"):
            by_kind = figures[f"{flavour}_val_by_kind"]
            assert set(by_kind) <= {"object", "colour", "shape"} and by_kind
            assert min(by_kind.values()) - 1e-3 <= figures[f"{flavour}_val_accuracy"] <= max(by_kind.values()) + 1e-3
    assert summary["runs_evaluated"] == 14 and summary["runs_reused"] == 0

    # with the cache: the zoo's runs are gathered, nothing is composed or evaluated again
    again = run_demo(
        "test",
        0,
        "demo2",
        root=zoo.root,
        combos={"image+audio+video+point": MODALITIES},
        merges={"linear": {}, "pcb": {"ratio": 0.5}},
    )
    assert again["runs_evaluated"] == 0 and again["runs_reused"] == 14
    assert (tmp_path / "demo2" / "demo.md").read_text() == table

    # a kept run is reused only for the same work: other merge parameters redo exactly the PCB runs
    other = run_demo(
        "test",
        0,
        "demo3",
        root=zoo.root,
        combos={"image+audio+video+point": MODALITIES},
        merges={"linear": {}, "pcb": {"ratio": 0.4}},
    )
    assert other["runs_evaluated"] == 4 and other["runs_reused"] == 10
    run = json.loads(
        (tmp_path / "demo3" / "runs" / "image_audio_video_point-naivemc-pcb-s0-mcub4" / "run.json").read_text()
    )
    assert run["model"]["demo_job"][4] == {"ratio": 0.4}


def test_the_demo_composes_with_any_registered_backend(zoo, tmp_path):
    from mcomp.zoo.demo import demo_merges

    assert demo_merges(["pcb", "tsv"]) == {"pcb": {"ratio": 0.5, "clip": 0.01}, "tsv": {}}
    with pytest.raises(ValueError, match=r"'nope': not a registered merge method"):
        demo_merges(["nope"])
    with pytest.raises(ValueError, match=r"'slerp' takes exactly 1 model"):
        demo_merges(["slerp"])
    run_demo(
        "test",
        0,
        tmp_path / "demo",
        root=zoo.root,
        combos={"image+audio+video+point": MODALITIES},
        merges=demo_merges(["tsv", "iso_cts"]),
    )
    table = (tmp_path / "demo" / "demo.md").read_text()
    for method in ("naivemc", "damc"):
        for merge in ("tsv", "iso_cts"):
            row = next(
                ln for ln in table.splitlines() if ln.startswith(f"| image+audio+video+point | {method} | {merge} |")
            )
            assert all(cell.strip() != "" for cell in row.strip("|").split("|")[3:])
