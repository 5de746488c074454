"""The modality registry: decorator, validation, and third-party plug-ins via entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcomp.modality import ModalityAdapter, available_adapters, get_adapter_class, register_modality

PLUGIN = Path(__file__).parent / "plugins" / "toy_plugin"


def test_builtin_image_adapter_is_registered():
    cls = get_adapter_class("image")
    assert cls.modality == "image" and cls.placeholder == "<image>"
    with pytest.raises(KeyError, match="unknown modality adapter 'nope'"):
        get_adapter_class("nope")


def test_register_validates_classes():
    with pytest.raises(TypeError, match="ModalityAdapter subclass"):
        register_modality("bad")(object)

    class NoPlaceholder(ModalityAdapter):
        modality = "x"

    with pytest.raises(TypeError, match="placeholder"):
        register_modality("bad2")(NoPlaceholder)

    class Clash(ModalityAdapter):
        modality = "image"
        placeholder = "<image>"

    with pytest.raises(ValueError, match="already registered"):
        register_modality("image")(Clash)


def test_decorated_modality_runs_through_the_model(tmp_path, tokenizer):
    sys.path.insert(0, str(PLUGIN))
    try:
        from toy_mcomp_plugin import ToyAdapter  # the plug-in's class, registered here by decorator
    finally:
        sys.path.remove(str(PLUGIN))
    register_modality("toy-decorated")(ToyAdapter)
    assert "toy-decorated" in available_adapters()
    from mcomp.tiny import build_tiny_mllm, tiny_image_adapter_config

    model = build_tiny_mllm([tiny_image_adapter_config(), {"adapter": "toy-decorated"}])
    f = tmp_path / "signal.txt"
    f.write_text("0.5 1.0 -2 3")
    inputs = model.prepare_inputs(["toy: <toy> sum?"], [{"toy": str(f)}])
    toy_positions = inputs.modality_ids[0] == model.modalities.index("toy")
    assert toy_positions.sum() == 4
    adapter = model.adapters["toy"]
    expected = adapter.projector(adapter.encoder(torch.tensor([[0.5], [1.0], [-2.0], [3.0]])))
    torch.testing.assert_close(inputs.inputs_embeds[0, toy_positions], expected)
    assert len(model.loglikelihood("toy: <toy> sum?", [" 2.5", " 0"], {"toy": str(f)})) == 2


def test_installed_plugin_is_discovered_by_entry_point(tmp_path):
    """pip-install the plug-in (no network) into a directory and use it from a fresh interpreter."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(PLUGIN),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    info = subprocess.run([sys.executable, "-m", "mcomp", "info"], env=env, capture_output=True, text=True, check=True)
    assert "image" in info.stdout and "placeholder=<image>" in info.stdout
    assert "toy " in info.stdout and "placeholder=<toy>" in info.stdout
    numbers = tmp_path / "n.txt"
    numbers.write_text("1 2 3 4")
    script = (
        "from mcomp.tiny import build_tiny_mllm, tiny_image_adapter_config\n"
        "m = build_tiny_mllm([tiny_image_adapter_config(), {'adapter': 'toy'}])\n"
        f"r = m.loglikelihood('<toy> and <image>', [' yes'], {{'toy': {str(numbers)!r}, 'image': None}})\n"
    )
    # Media None for image is invalid: the error must name the image input, proving both adapters ran.
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "image input" in run.stderr
    script_ok = (
        script.replace(", 'image': None", "").replace("<toy> and <image>", "<toy> then?")
        + "print(round(r[0].logprob, 3))\n"
    )
    ok = subprocess.run([sys.executable, "-c", script_ok], env=env, capture_output=True, text=True, check=True)
    assert float(ok.stdout.strip()) < 0
