"""`mcomp train` resumes only the same run: checkpoints carry a run identity (data, start model,
config, code), --force starts afresh, a run killed mid-training resumes to the uninterrupted run's
bytes, and the data is checked before step 1 (files decode, placeholders match, media stay inside
the data root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import mcomp
from mcomp.cli import main
from mcomp.data import TrainingDataError, load_conversation_data
from mcomp.fingerprint import IdentityMismatch
from mcomp.io import OutputBusyError, output_lock, sha256_file
from mcomp.model import MultimodalLM
from mcomp.tiny import build_llm, build_tokenizer, tiny_image_adapter_config
from mcomp.train import TrainConfig, train
from tests.composition_fixtures import COLOURS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["train", "--base", "tiny", "--adapter", "tiny:image"]
RUN = ["--stage", "2", "--lora-r", "4", "--learning-rate", "0.01", "--max-steps", "3", "--batch-size", "2"]


def write_data(root: Path, answers=tuple(COLOURS), extra: list[dict] | None = None) -> Path:
    """Three coloured images with a question each (answers as given), plus `extra` samples."""
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i, rgb in enumerate(COLOURS.values()):
        Image.new("RGB", (40, 32), rgb).save(root / f"img{i}.png")
        items.append(
            {
                "id": f"img{i}",
                "modal_inputs": {"image": [f"img{i}.png"]},
                "conversations": [
                    {"from": "human", "value": "image: <image>\nWhat colour is it?"},
                    {"from": "gpt", "value": answers[i]},
                ],
            }
        )
    path = root / "train.json"
    path.write_text(json.dumps(items + (extra or [])))
    return path


def sample(sample_id: str, files: list[str], question: str = "image: <image>\nWhat colour is it?") -> dict:
    return {
        "id": sample_id,
        "modal_inputs": {"image": files},
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}],
    }


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def trainer_state(checkpoints: Path) -> dict:
    (latest,) = checkpoints.glob("step-*")
    return json.loads((latest / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity_data")
    return {"d1": write_data(root / "d1"), "d2": write_data(root / "d2", answers=("crimson", "lime", "navy"))}


# -- stale checkpoints -----------------------------------------------------------------------------
def test_force_after_a_run_on_other_data_trains_afresh_on_the_new_data(data, tmp_path, capsys):
    out = tmp_path / "x"
    assert main([*TINY, "--data", str(data["d1"]), *RUN, "--out", str(out)]) == 0
    first = files_of(out)
    capsys.readouterr()

    # the same checkpoint folder with other data, no --force: refused, naming what changed
    code = main(
        [*TINY, "--data", str(data["d2"]), *RUN, "--out", str(tmp_path / "y"), "--checkpoint-dir", f"{out}.checkpoints"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "holds different work" in err and "data_sha256" in err and "--force" in err
    assert not (tmp_path / "y").exists()

    assert main([*TINY, "--data", str(data["d2"]), *RUN, "--out", str(out), "--force"]) == 0
    printed = capsys.readouterr().out
    assert "trained 3 steps, final loss" in printed and "resumed" not in printed
    assert mcomp.load(out).provenance["training"][-1]["steps"] == 3
    assert trainer_state(Path(f"{out}.checkpoints"))["identity"]["data_sha256"] == sha256_file(data["d2"])
    second = files_of(out)
    assert second["lora/text/adapter_model.safetensors"] != first["lora/text/adapter_model.safetensors"]
    assert second["projectors.safetensors"] != first["projectors.safetensors"]

    fresh = tmp_path / "z"
    assert main([*TINY, "--data", str(data["d2"]), *RUN, "--out", str(fresh)]) == 0
    assert files_of(fresh) == second  # every file, configs included, byte for byte


def save_start_model(path: Path, seed: int) -> Path:
    tokenizer = build_tokenizer()
    MultimodalLM.build(
        build_llm(tokenizer, seed=0), tokenizer, [tiny_image_adapter_config()], seed=seed
    ).save_pretrained(path)
    return path


def test_another_init_with_stale_checkpoints_is_refused(data, tmp_path, capsys):
    first, other = save_start_model(tmp_path / "init1", 0), save_start_model(tmp_path / "init2", 1)
    out = tmp_path / "x"
    assert main(["train", "--init", str(first), "--data", str(data["d1"]), *RUN, "--out", str(out)]) == 0
    capsys.readouterr()
    code = main(
        [
            "train",
            "--init",
            str(other),
            "--data",
            str(data["d1"]),
            *RUN,
            "--out",
            str(tmp_path / "y"),
            "--checkpoint-dir",
            f"{out}.checkpoints",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "start_model.init_digest" in err and "data_sha256" not in err


def test_another_base_llm_with_stale_checkpoints_is_refused(data, tmp_path, capsys):
    tokenizer = build_tokenizer()
    bases = []
    for seed in (0, 1):
        base = tmp_path / f"base{seed}"
        build_llm(tokenizer, seed=seed).save_pretrained(base)
        tokenizer.save_pretrained(base)
        bases.append(base)
    out = tmp_path / "x"
    assert (
        main(
            [
                "train",
                "--base",
                str(bases[0]),
                "--adapter",
                "tiny:image",
                "--data",
                str(data["d1"]),
                *RUN,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = main(
        [
            "train",
            "--base",
            str(bases[1]),
            "--adapter",
            "tiny:image",
            "--data",
            str(data["d1"]),
            *RUN,
            "--out",
            str(tmp_path / "y"),
            "--checkpoint-dir",
            f"{out}.checkpoints",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "start_model.base_sha256" in err


def test_a_checkpoint_without_identity_or_of_another_library_run_is_refused(data, tmp_path):
    tokenizer = build_tokenizer()
    samples = load_conversation_data(data["d1"])
    cfg = TrainConfig(stage=2, lora_r=4, max_steps=2, batch_size=2, save_every=1, log_every=0)
    model = MultimodalLM.build(build_llm(tokenizer, seed=0), tokenizer, [tiny_image_adapter_config()])
    train(model, samples, cfg, tmp_path / "ckpt", stop_after=1)
    other_start = MultimodalLM.build(build_llm(tokenizer, seed=0), tokenizer, [tiny_image_adapter_config()], seed=3)
    with pytest.raises(IdentityMismatch, match=r"trainable.sha256"):  # train() sees the starting weights itself
        train(other_start, samples, cfg, tmp_path / "ckpt")
    with pytest.raises(IdentityMismatch, match=r"samples_sha256"):
        train(
            MultimodalLM.build(build_llm(tokenizer, seed=0), tokenizer, [tiny_image_adapter_config()]),
            samples[:2],
            cfg,
            tmp_path / "ckpt",
        )
    state_file = tmp_path / "ckpt" / "step-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["identity"]  # as written before checkpoints carried one
    state_file.write_text(json.dumps(state))
    with pytest.raises(IdentityMismatch, match=r"records no run identity .*--force"):
        train(
            MultimodalLM.build(build_llm(tokenizer, seed=0), tokenizer, [tiny_image_adapter_config()]),
            samples,
            cfg,
            tmp_path / "ckpt",
        )
    summary = train(
        MultimodalLM.build(build_llm(tokenizer, seed=0), tokenizer, [tiny_image_adapter_config()]),
        samples,
        cfg,
        tmp_path / "ckpt",
        restart=True,
    )
    assert summary["steps"] == 2 and summary["resumed_from"] == 0
    with output_lock(tmp_path / "ckpt"), pytest.raises(OutputBusyError):  # another run holds the folder
        train(
            MultimodalLM.build(build_llm(tokenizer, seed=0), tokenizer, [tiny_image_adapter_config()]),
            samples,
            cfg,
            tmp_path / "ckpt",
        )


def test_force_clears_only_a_checkpoint_folder_and_never_an_input(data, tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code = main(
        [
            *TINY,
            "--data",
            str(data["d1"]),
            *RUN,
            "--out",
            str(tmp_path / "x"),
            "--force",
            "--checkpoint-dir",
            str(folder),
        ]
    )
    assert code == 1 and "does not look like an mcomp training checkpoint folder" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()
    code = main(
        [
            *TINY,
            "--data",
            str(data["d1"]),
            *RUN,
            "--out",
            str(tmp_path / "x"),
            "--force",
            "--checkpoint-dir",
            str(data["d1"].parent),
        ]
    )
    assert code == 1 and "contains the input" in capsys.readouterr().err
    start = save_start_model(tmp_path / "init", 0)
    before = files_of(start)
    code = main(["train", "--init", str(start), "--data", str(data["d1"]), *RUN, "--out", str(start), "--force"])
    assert code == 1 and "is the input" in capsys.readouterr().err
    assert files_of(start) == before


# -- kill -9 and byte reproducibility --------------------------------------------------------------
def run_mcomp(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "1"}
    env.pop("MCOMP_FAULT", None)
    if fault:
        env["MCOMP_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "mcomp", *args], env=env, capture_output=True, text=True, timeout=300)


def test_killed_mid_training_then_rerun_gives_the_uninterrupted_runs_bytes(data, tmp_path):
    config = tmp_path / "train.json"  # dropout and a schedule: the resumed run must restore RNG and scheduler
    config.write_text(json.dumps({"lora_dropout": 0.1, "warmup_steps": 1, "lr_scheduler": "cosine"}))
    args = [
        *TINY,
        "--data",
        str(data["d1"]),
        *RUN,
        "--max-steps",
        "4",
        "--decoupled",
        "--config",
        str(config),
        "--save-every",
        "1",
    ]
    out = tmp_path / "killed"
    killed = run_mcomp(*args, "--out", str(out), fault="train.checkpoint_saved@2")
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and trainer_state(Path(f"{out}.checkpoints"))["step"] == 2
    rerun = run_mcomp(*args, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert "trained 4 steps (2 in this run, resumed from step 2" in rerun.stdout
    straight = tmp_path / "straight"
    assert main([*args, "--out", str(straight)]) == 0  # another process, another hash seed
    assert files_of(out) == files_of(straight)


def test_two_runs_give_the_same_bytes(data, tmp_path):
    args = [*TINY, "--data", str(data["d1"]), *RUN, "--decoupled"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--checkpoint-dir", str(tmp_path / "elsewhere")]) == 0
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert a == b and "mcomp_config.json" in a and "lora/image/adapter_config.json" in a
    assert str(tmp_path) not in a["mcomp_config.json"].decode()  # nothing of where this run wrote


# -- data checked before step 1 --------------------------------------------------------------------
def bad_sample(root: Path, case: str, outside: Path) -> dict:
    if case == "missing file":
        return sample("bad", ["nowhere.png"])
    if case == "corrupt image":
        (root / "noise.png").write_bytes(os.urandom(600))
        return sample("bad", ["noise.png"])
    if case == "placeholder count":
        return sample("bad", ["img0.png", "img1.png"])  # two files, one <image>
    Image.new("RGB", (40, 32), (1, 2, 3)).save(outside / "elsewhere.png")
    if case == "symlink out of the root":
        (root / "link.png").symlink_to(outside / "elsewhere.png")
        return sample("bad", ["link.png"])
    return sample("bad", ["../outside/elsewhere.png"])  # '..' out of the root


CASES = {
    "missing file": "nowhere.png': file not found",
    "corrupt image": "noise.png': not a recognised image format",
    "placeholder count": "hold 1 <image> placeholder(s) but modal_inputs gives 2 image file(s)",
    "symlink out of the root": "link.png' resolves to",
    "'..' out of the root": "elsewhere.png' resolves to",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_refused_before_step_1_naming_sample_and_file(tmp_path, capsys, case):
    root, outside = tmp_path / "data", tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    path = write_data(root, extra=[bad_sample(root, case, outside)])
    out = tmp_path / "out"
    code = main([*TINY, "--data", str(path), *RUN, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "found before training" in err and "sample bad" in err and CASES[case] in err, err
    assert "train stage" not in err  # no step ran
    assert not out.exists() and not Path(f"{out}.checkpoints").exists()
    if case == "symlink out of the root":
        assert main([*TINY, "--data", str(path), *RUN, "--out", str(out), "--allow-media-outside-root"]) == 0


def test_errors_met_in_a_batch_name_the_sample_and_file(tmp_path, monkeypatch):
    import mcomp.train

    monkeypatch.setattr(mcomp.train, "check_training_data", lambda *a, **k: None)  # as if a file broke mid-run
    root = tmp_path / "data"
    root.mkdir()
    (root / "noise.png").write_bytes(os.urandom(600))
    tokenizer = build_tokenizer()
    cfg = TrainConfig(stage=2, lora_r=4, max_steps=2, batch_size=4, log_every=0)
    for extra, expected in (
        (sample("bad", ["noise.png"]), r"sample bad: cannot use image input '.*noise.png'"),
        (
            sample("bad", ["img0.png", "img1.png"]),
            r"sample bad \(media: .*img0.png, .*img1.png\): the prompt has 1 <image>",
        ),
    ):
        samples = load_conversation_data(write_data(root, extra=[extra]))
        model = MultimodalLM.build(build_llm(tokenizer, seed=0), tokenizer, [tiny_image_adapter_config()])
        with pytest.raises(TrainingDataError, match=expected):
            train(model, samples, cfg, tmp_path / f"ckpt-{len(extra['modal_inputs']['image'])}")
