"""The `mcomp` command line: help, version, info, ask, every flag's help, world generate."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mcomp
from mcomp.cli import main


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mcomp {mcomp.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "info" in out and "ask" in out


def test_console_script_is_installed():
    bin_dir = __import__("pathlib").Path(sys.executable).parent
    out = subprocess.run([str(bin_dir / "mcomp"), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"mcomp {mcomp.__version__}"


def test_info_lists_versions_devices_kernels_modalities(capsys, monkeypatch):
    from mcomp.merge import native

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "transformers" in out and "devices: cpu" in out
    assert "placeholder=<image>" in out
    kernels = next(line for line in out.splitlines() if line.startswith("merge kernels: "))
    assert ("accelerating" in kernels and "ties" in kernels) == native.available()
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("MCOMP_NATIVE", "0")
    assert main(["info"]) == 0
    assert "merge kernels: NumPy/torch path (MCOMP_NATIVE=0" in capsys.readouterr().out


def test_every_flag_of_every_command_says_what_it_does():
    import argparse

    from mcomp.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = {
        name: [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions if not a.help]
        for name, parser in commands.choices.items()
    }
    assert {name: flags for name, flags in silent.items() if flags} == {}


def test_ask_generates_and_scores(capsys, image_files):
    assert (
        main(["ask", "--tiny", "--media", f"image={image_files['png']}", "--max-new-tokens", "3", "What is it?"]) == 0
    )
    assert capsys.readouterr().out.startswith("answer: ")
    assert main(["ask", "--tiny", "--media", f"image={image_files['png']}", "--options", "red,blue", "Colour?"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("red\tlogprob=-") and lines[1].startswith("blue\tlogprob=-")
    assert lines[2] in ("answer: red", "answer: blue")


def test_ask_errors_are_one_clear_line(capsys, image_files):
    assert main(["ask", "--tiny", "--media", "image", "q"]) == 1
    assert "expected MODALITY=PATH" in capsys.readouterr().err
    assert main(["ask", "--tiny", "--media", f"image={image_files['truncated']}", "q"]) == 1
    err = capsys.readouterr().err
    assert "truncated.png" in err and "Traceback" not in err


def test_world_generate_writes_the_benchmark_a_seed_fixes(tmp_path, capsys):
    """`mcomp world generate` writes the world of its size and seed (same seed, same bytes:
    tests/test_world.py), and names the benchmark's data root for `mcomp eval`."""
    from mcomp.world.generate import WorldManifest, digest, load_world_config

    assert main(["world", "generate", "--size", "test", "--seed", "3", "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    world = WorldManifest.load(tmp_path / "cli")
    assert (world.seed, world.size, world.config_digest) == (3, "test", digest(load_world_config("test")))
    assert f"--data-root {world.mcub_root('test')}" in out and world.mcub_questions("test").is_file()
    assert all(world.path(rel).stat().st_size == meta["bytes"] for rel, meta in world.files.items())
