"""Adding a modality to the demo is one adapter module plus one modality file (the walk-through of
docs/adding_a_modality.md, "Adding it to the demo"): the depth plug-in under tests/plugins/depth_plugin,
installed as a package, gets rendered by the synthetic world, its encoder pretrained and its models
trained by the zoo, and composed with the image model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mcomp.modalities import MODALITIES, read_modality_file

PLUGIN = Path(__file__).parent / "plugins" / "depth_plugin"
MODALITY_FILE = PLUGIN / "depth.yaml"

SCRIPT = """
import json, sys
import torch
import mcomp
from mcomp.compose import compose
from mcomp.zoo import build_zoo

root, modality_file = sys.argv[1], sys.argv[2]
zoo = build_zoo("test", 0, root, workers=2, modalities=["image", modality_file])
composed = compose({m: zoo.model(m, "naivemc", 0) for m in ("image", "depth")}, method="naivemc")
single = mcomp.load(zoo.model("depth", "naivemc", 0))
same_projector = all(
    torch.equal(a, b)
    for a, b in zip(composed.adapters["depth"].projector.state_dict().values(),
                    single.adapters["depth"].projector.state_dict().values())
)
world = zoo.world
question = json.loads(world.val_json("depth").read_text())[0]
media = {"depth": str(world.val_json("depth").parent / question["modal_inputs"]["depth"][0])}
scores = composed.loglikelihood(question["conversations"][0]["value"], [" a red cube", " a blue cone"], media)
print(json.dumps({
    "modalities": zoo.manifest["modalities"],
    "encoders": sorted(zoo.manifest["encoders"]),
    "models": sorted(zoo.manifest["models"]),
    "held_out": zoo.manifest["models"]["depth-s0"].get("naivemc_val_accuracy"),
    "adapters": sorted(composed.adapters),
    "same_projector": same_projector,
    "scores": [s.logprob for s in scores],
    "world": str(world.root),
}))
"""


@pytest.fixture(autouse=True)
def table_as_it_was():
    """Rows a test adds (a world manifest it loads adds its modalities') are taken out again."""
    before = dict(MODALITIES)
    yield
    MODALITIES.clear()
    MODALITIES.update(before)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The plug-in pip-installed (no network) into a folder that a fresh interpreter imports from."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation"]
        + ["--target", str(target), str(PLUGIN)],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


def test_a_modality_file_and_its_adapter_module_join_the_demo(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "zoo"), str(MODALITY_FILE)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["modalities"] == ["image", "depth"]
    assert got["encoders"] == ["depth", "image"] and got["models"] == ["depth-s0", "image-s0"]
    assert 0.0 <= got["held_out"] <= 1.0
    assert got["adapters"] == ["depth", "image"] and got["same_projector"]
    assert all(np.isfinite(got["scores"])) and got["scores"][0] != got["scores"][1]

    # the world rendered the depth files with the plug-in's renderer: RGB-D arrays whose object pixels
    # (near: low depth) show the entity's colour, as labels.json names it (the nearest palette colour)
    from mcomp.world import WorldManifest

    world = WorldManifest.load(got["world"])
    space_colours = {c["name"]: c["rgb"] for c in world.config["attributes"]["colours"]}
    labels = {rel: key for rel, key in world.labels().items() if "/media/depth/" in rel}
    assert len(labels) > 20 and all(rel.endswith(".npy") for rel in labels)
    checked = 0
    for rel, key in sorted(labels.items())[:12]:
        array = np.load(world.path(rel), allow_pickle=False).astype(np.float32)
        assert array.shape == (4, 16, 16)
        near = array[3] < 0.5
        if near.sum() < 4:
            continue
        colour = array[:3][:, near].mean(axis=1) * 255
        nearest = min(space_colours, key=lambda name: float(np.abs(colour - np.asarray(space_colours[name])).sum()))
        assert nearest == key.split("_")[0], (rel, colour)
        checked += 1
    assert checked >= 6
    depth_data = json.loads(world.train_json("depth").read_text())
    assert depth_data[0]["conversations"][0]["value"].startswith("depth: <depth>\n")


def test_modality_files_are_checked_and_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nplaceholder: '<x>'\npublished_key: x\nextension: npy\nnoun: x map\n")
    with pytest.raises(ValueError, match=r"bad.yaml: extension must start with '.'"):
        read_modality_file(bad)
    bad.write_text("name: x\nplaceholder: '<image>'\npublished_key: x\nextension: .x\nnoun: x map\n")
    with pytest.raises(ValueError, match=r"bad.yaml: placeholder '<image>' is already modality 'image'"):
        read_modality_file(bad)
    bad.write_text("name: x\nplaceholder: '<x>'\npublished_key: x\nextension: .x\nnoun: x\ndemo: {render: {}}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: demo.adapter must be an adapter config"):
        read_modality_file(bad)
    assert "x" not in MODALITIES


def test_a_world_with_a_modality_it_cannot_render_is_refused_before_anything_is_written(tmp_path):
    from mcomp.world import generate_world

    other = tmp_path / "other.yaml"
    other.write_text(
        "name: sonar\nplaceholder: '<sonar>'\npublished_key: sonar\nextension: .npy\nnoun: sonar scan\n"
        "demo: {adapter: {adapter: sonar}}\n"
    )
    with pytest.raises(ValueError, match="the world has no renderer for modality 'sonar'"):
        generate_world(tmp_path / "w", size="test", modalities=["image", other])
    assert not (tmp_path / "w").exists()
