"""Every output directory carries its recipe and model card: `mcomp COMMAND --from OUT/mcomp_recipe.yaml
--out OTHER` makes the output again byte for byte (train, compose and merge here; import in the import
tests), flags beside --from override the recipe, and the card names the inputs with their sha256."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from mcomp.cli import main
from mcomp.output_record import CARD_NAME, RECIPE_NAME
from tests.composition_fixtures import write_audio_data, write_image_data
from tests.test_fault_injection import merge_yaml, write_checkpoints
from tests.test_train_identity import files_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = ["--stage", "2", "--lora-r", "4", "--learning-rate", "0.01", "--max-steps", "3", "--batch-size", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny image model and a tiny audio model, trained from the command line for three steps."""
    root = tmp_path_factory.mktemp("record")
    data = {"image": write_image_data(root), "audio": write_audio_data(root)}
    outs = {}
    for modality, path in data.items():
        outs[modality] = root / f"{modality}-model"
        argv = ["train", "--base", "tiny", "--adapter", f"tiny:{modality}", "--data", str(path), *RUN]
        assert main([*argv, "--out", str(outs[modality])]) == 0
    return {"root": root, "data": data, "models": outs}


def recipe_of(out):
    return yaml.safe_load((out / RECIPE_NAME).read_text())


def test_a_training_recipe_trains_the_same_model_again_byte_for_byte(trained, tmp_path):
    first = trained["models"]["image"]
    again = tmp_path / "again"
    assert main(["train", "--from", str(first / RECIPE_NAME), "--out", str(again)]) == 0
    assert files_of(again) == files_of(first)
    recipe = recipe_of(first)
    assert recipe["command"] == ["train"] and recipe["arguments"]["config"]["max_steps"] == 3
    assert recipe["arguments"]["data"] == str(trained["data"]["image"].resolve())


def test_flags_beside_from_override_the_recipe(trained, tmp_path):
    first = trained["models"]["image"]
    other = tmp_path / "shorter"
    assert main(["train", "--from", str(first / RECIPE_NAME), "--max-steps", "2", "--out", str(other)]) == 0
    assert recipe_of(other)["arguments"]["config"]["max_steps"] == 2
    assert "| optimizer steps | 2 |" in (other / CARD_NAME).read_text()
    assert (
        files_of(other)["lora/text/adapter_model.safetensors"] != files_of(first)["lora/text/adapter_model.safetensors"]
    )


def test_the_card_names_the_inputs_with_their_sha256(trained):
    card = (trained["models"]["audio"] / CARD_NAME).read_text()
    data = trained["data"]["audio"]
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    assert f"| data | `{data.resolve()}` | `{digest}` |" in card
    assert "| optimizer steps | 3 |" in card and "| torch |" in card
    assert "mcomp train --from mcomp_recipe.yaml --out OTHER" in card


def test_a_composition_recipe_composes_the_same_model_again(trained, tmp_path):
    models = ",".join(f"{m}={p}" for m, p in trained["models"].items())
    first, again = tmp_path / "composed", tmp_path / "again"
    argv = ["compose", "--models", models, "--merge", "ties", "--merge-params", "density=0.5", "--weights", "image=0.6"]
    assert main([*argv, "--out", str(first)]) == 0
    assert main(["compose", "--from", str(first / RECIPE_NAME), "--out", str(again)]) == 0
    assert files_of(again) == files_of(first)
    arguments = recipe_of(first)["arguments"]
    assert arguments["merge"] == "ties" and arguments["merge_params"] == "density=0.5"
    card = (first / CARD_NAME).read_text()
    for modality, path in trained["models"].items():
        assert f"| {modality} model | `{path.resolve()}` |" in card


def test_a_recipe_is_refused_by_another_command_and_with_unknown_arguments(trained, tmp_path, capsys):
    recipe = trained["models"]["image"] / RECIPE_NAME
    assert main(["compose", "--from", str(recipe), "--out", str(tmp_path / "x")]) == 1
    assert "a recipe of `mcomp train`, given to `mcomp compose`" in capsys.readouterr().err
    spoilt = tmp_path / RECIPE_NAME
    data = recipe_of(trained["models"]["image"])
    data["arguments"]["learning_rat"] = 0.1
    spoilt.write_text(yaml.safe_dump(data))
    assert main(["train", "--from", str(spoilt), "--out", str(tmp_path / "y")]) == 1
    assert "['learning_rat'] are not options of `mcomp train`" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_merge_recipe_merges_the_same_checkpoint_again(tmp_path, monkeypatch):
    base, models = write_checkpoints(tmp_path / "inputs")
    monkeypatch.chdir(tmp_path)  # the YAML names its inputs relative to here; the recipe holds them absolute
    inputs = base.relative_to(tmp_path), [m.relative_to(tmp_path) for m in models]
    config = merge_yaml(
        tmp_path, *inputs, "dare_ties", density=0.5, seed=3
    )  # mcomp's reading: the seed fixes the draws
    first, again = tmp_path / "merged", tmp_path / "again"
    assert main(["merge", str(config), "--out", str(first), "--no-progress"]) == 0
    monkeypatch.chdir(first)  # anywhere else
    assert main(["merge", "--from", str(first / RECIPE_NAME), "--out", str(again), "--no-progress"]) == 0
    assert files_of(again) == files_of(first)
    recipe = recipe_of(first)["arguments"]["config"]
    assert recipe["merge_method"] == "dare_ties" and recipe["base_model"] == str(base)
    assert recipe["parameters"] == {"density": 0.5, "seed": 3}
    assert [m["model"] for m in recipe["models"]] == [str(m) for m in models]
    card = (first / CARD_NAME).read_text()
    digest = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    files = hashlib.sha256(f"model.safetensors\0{digest}\n".encode()).hexdigest()  # directory_digest's rule
    assert f"| base | `{base}` | `{files}` |" in card and "| passes over the inputs | 2 |" in card


def test_an_input_that_is_not_there_is_refused_not_digested_as_nothing(tmp_path):
    from mcomp.output_record import input_sha256

    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        input_sha256(tmp_path / "missing")
