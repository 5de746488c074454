"""Fault injection on merge and compose: kill -9 at named points then rerun, concurrent writers,
outputs that would replace their inputs, overflowing results, the umask, and byte-identical
outputs across processes (different hash seeds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mcomp.cli import main
from mcomp.io import NonFiniteError, OutputBusyError, atomic_directory, check_finite, output_lock
from mcomp.merge import merge_checkpoints

pytestmark = pytest.mark.usefixtures("one_torch_thread")
sys.path.insert(0, str(Path(__file__).parent))


def run_mcomp(
    *args: str, fault: str | None = None, hash_seed: str = "0", umask: int | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    env.pop("MCOMP_FAULT", None)
    if fault:
        env["MCOMP_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "mcomp", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=cwd,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
        timeout=300,
    )


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_checkpoints(root: Path, n: int = 2, scale: float = 0.01) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "embed.weight": (40, 16),
        "layers.0.q.weight": (16, 16),
        "layers.0.norm.weight": (16,),
        "layers.1.up.weight": (32, 16),
    }
    base = {k: torch.randn(s, generator=g).half() * 0.1 for k, s in shapes.items()}
    paths = []
    for i, sd in enumerate(
        [base]
        + [
            {k: (v.float() + scale * torch.randn(v.shape, generator=g)).half() for k, v in base.items()}
            for _ in range(n)
        ]
    ):
        d = root / ("base" if i == 0 else f"ft{i}")
        d.mkdir(parents=True)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        paths.append(d)
    return paths[0], paths[1:]


def merge_yaml(root: Path, base: Path, models: list[Path], method: str = "ties", **params) -> Path:
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "dtype": "float16",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        "parameters": params or {"density": 0.5},
    }
    path = root / f"{method}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# -- merge ---------------------------------------------------------------------------------------
def test_merge_killed_mid_write_then_rerun_equals_an_uninterrupted_merge(tmp_path):
    base, models = write_checkpoints(tmp_path)
    cfg = merge_yaml(tmp_path, base, models)
    killed = run_mcomp(
        "merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress", fault="merge.tensor_written@2"
    )
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "out").exists()
    assert [n for n in leftovers(tmp_path, "out") if n.endswith(".partial")]  # what kill -9 leaves
    rerun = run_mcomp("merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert "left by an interrupted run" in rerun.stderr
    assert leftovers(tmp_path, "out") == []
    clean = run_mcomp("merge", str(cfg), "--out", str(tmp_path / "clean"), "--no-progress", hash_seed="1")
    assert clean.returncode == 0, clean.stderr
    assert files_of(tmp_path / "out") == files_of(tmp_path / "clean")


def merged_once(root: Path) -> tuple[Path, list[Path], dict[str, bytes]]:
    """Checkpoints under `root`, merged with TIES into `root/out`: (base, models, the output's files)."""
    base, models = write_checkpoints(root)
    cfg = merge_yaml(root, base, models)
    assert run_mcomp("merge", str(cfg), "--out", str(root / "out"), "--no-progress").returncode == 0
    return base, models, files_of(root / "out")


def test_merge_killed_before_commit_keeps_the_old_output_under_force(tmp_path):
    base, models, before = merged_once(tmp_path)
    killed = run_mcomp(
        "merge",
        str(merge_yaml(tmp_path, base, models, "task_arithmetic", scale=0.5)),
        "--out",
        str(tmp_path / "out"),
        "--force",
        "--no-progress",
        fault="output.commit",
    )
    assert killed.returncode == -9
    assert files_of(tmp_path / "out") == before  # the earlier output is whole until the new one is


def test_a_second_merge_into_the_same_out_is_refused(tmp_path):
    base, models, first = merged_once(tmp_path)
    second = run_mcomp(
        "merge",
        str(merge_yaml(tmp_path, base, models, "task_arithmetic", scale=0.5)),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert second.returncode != 0 and "already exists" in second.stderr
    assert files_of(tmp_path / "out") == first


def test_concurrent_writers_of_one_out_cannot_both_succeed(tmp_path):
    base, models = write_checkpoints(tmp_path)
    out = tmp_path / "out"
    with output_lock(out):  # another process is writing `out`
        with pytest.raises(OutputBusyError, match="being written by another process"):
            merge_checkpoints(base, models, out, "ties", density=0.5)
        cli = run_mcomp("merge", str(merge_yaml(tmp_path, base, models)), "--out", str(out), "--no-progress")
        assert cli.returncode != 0 and "being written by another process" in cli.stderr
    assert not out.exists()
    # one that appears while this one builds (a writer that holds no lock) is not replaced
    with pytest.raises(FileExistsError, match="appeared while"):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("mine")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert leftovers(tmp_path, "out") == []


def test_two_merge_processes_racing_for_one_out(tmp_path):
    base, models = write_checkpoints(tmp_path, n=3)
    cfg = merge_yaml(tmp_path, base, models)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mcomp", "merge", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, err in results if code != 0)
    assert "being written by another process" in loser or "already exists" in loser
    assert (tmp_path / "out" / "model.safetensors").is_file() and leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("where", ["contains", "inside", "same"])
def test_force_never_replaces_an_input(tmp_path, where):
    root = tmp_path / "models"
    base, models = write_checkpoints(root)
    out = {"contains": root, "inside": base / "merged", "same": models[0]}[where]
    if where == "inside":
        out.mkdir()
    before = {p: files_of(p) for p in (base, *models)}
    with pytest.raises(ValueError, match="write the output somewhere else"):
        merge_checkpoints(base, models, out, "ties", force=True, density=0.5)
    assert {p: files_of(p) for p in (base, *models)} == before


def test_a_merge_that_overflows_fp16_is_refused_naming_the_tensor(tmp_path):
    base, models = write_checkpoints(tmp_path)
    big = load_file(str(models[0] / "model.safetensors"))
    big["layers.0.q.weight"][3, 4] = 60000.0  # + the second model's 60000 overflows fp16 (max 65504)
    save_file(big, str(models[0] / "model.safetensors"))
    big2 = load_file(str(models[1] / "model.safetensors"))
    big2["layers.0.q.weight"][3, 4] = 60000.0
    save_file(big2, str(models[1] / "model.safetensors"))
    with pytest.raises(NonFiniteError) as err:
        merge_checkpoints(base, models, tmp_path / "out", "task_arithmetic", dtype="float16")
    assert "'layers.0.q.weight'" in str(err.value) and str(models[0]) in str(err.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []
    merge_checkpoints(base, models, tmp_path / "out32", "task_arithmetic", dtype="float32")  # fits in fp32
    assert load_file(str(tmp_path / "out32" / "model.safetensors"))["layers.0.q.weight"].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_finite_check_finds_one_bad_value_anywhere(dtype):
    values = torch.randn(1 << 21, generator=torch.Generator().manual_seed(0)).to(dtype)
    check_finite("w", values, "out.safetensors")
    # the first value, one inside a vector, one in the second thread's share, the last
    for pos in (0, 12345, values.numel() // 2 + 7, values.numel() - 1):
        for bad in (float("nan"), float("inf"), -float("inf")):
            spoilt = values.clone()
            spoilt[pos] = bad
            with pytest.raises(NonFiniteError, match="'w' has 1 Inf/NaN"):
                check_finite("w", spoilt, "out.safetensors")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, umask):
    base, models = write_checkpoints(tmp_path)
    done = run_mcomp(
        "merge", str(merge_yaml(tmp_path, base, models)), "--out", str(tmp_path / "out"), "--no-progress", umask=umask
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in (tmp_path / "out").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


# -- compose -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from composition_fixtures import train_models

    return train_models(tmp_path_factory.mktemp("trained"))


def test_compose_refuses_a_modality_given_twice(trained, tmp_path):
    done = run_mcomp(
        "compose",
        "--models",
        f"image={trained['image-plain']},image={trained['image-damc']}",
        "--out",
        str(tmp_path / "c"),
    )
    assert done.returncode != 0 and "'image' is given twice" in done.stderr
    done = run_mcomp(
        "compose",
        "--models",
        f"image={trained['image-plain']},audio={trained['audio-plain']}",
        "--weights",
        "image=1,image=0.5",
        "--out",
        str(tmp_path / "c"),
    )
    assert done.returncode != 0 and "'image' is given twice" in done.stderr
    assert not (tmp_path / "c").exists()


def test_compose_seed_reaches_dare_and_outputs_repeat_byte_for_byte(trained, tmp_path):
    models = f"image={trained['image-plain']},audio={trained['audio-plain']}"
    common = ["compose", "--models", models, "--merge", "dare_ties", "--merge-params", "density=0.5"]
    runs = {}
    for name, seed, hash_seed in (("a", "1", "0"), ("b", "1", "123")):
        done = run_mcomp(*common, "--seed", seed, "--out", str(tmp_path / name), hash_seed=hash_seed)
        assert done.returncode == 0, done.stderr
        runs[name] = files_of(tmp_path / name)
    assert main([*common, "--seed", "2", "--out", str(tmp_path / "c")]) == 0  # in this process: quicker
    runs["c"] = files_of(tmp_path / "c")
    assert runs["a"] == runs["b"]  # same seed, another process and hash seed: every byte the same
    differing = sorted(k for k in runs["a"] if runs["a"][k] != runs["c"].get(k))
    assert "base/model.safetensors" in differing  # the drop masks follow --seed
    assert json.loads(runs["c"]["mcomp_config.json"])["provenance"]["composition"]["seed"] == 2


def test_compose_linear_outputs_repeat_byte_for_byte_across_hash_seeds(trained, tmp_path):
    models = f"image={trained['image-damc']},audio={trained['audio-damc']}"
    for name, hash_seed in (("a", "0"), ("b", "4242")):
        done = run_mcomp(
            "compose", "--models", models, "--method", "damc", "--out", str(tmp_path / name), hash_seed=hash_seed
        )
        assert done.returncode == 0, done.stderr
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert any(k.endswith("adapter_config.json") for k in a)
    assert a == b


def test_compose_killed_before_commit_then_rerun(trained, tmp_path):
    models = f"image={trained['image-plain']},audio={trained['audio-plain']}"
    killed = run_mcomp(
        "compose", "--models", models, "--merge", "ties", "--out", str(tmp_path / "c"), fault="output.commit"
    )
    assert killed.returncode == -9
    assert not (tmp_path / "c").exists() and leftovers(tmp_path, "c")
    assert run_mcomp("compose", "--models", models, "--merge", "ties", "--out", str(tmp_path / "c")).returncode == 0
    assert leftovers(tmp_path, "c") == []
    assert main(["compose", "--models", models, "--merge", "ties", "--out", str(tmp_path / "d")]) == 0
    assert files_of(tmp_path / "c") == files_of(tmp_path / "d")


def test_compose_output_follows_the_umask(trained, tmp_path):
    models = f"image={trained['image-plain']},audio={trained['audio-plain']}"
    done = run_mcomp("compose", "--models", models, "--merge", "ties", "--out", str(tmp_path / "c"), umask=0o027)
    assert done.returncode == 0, done.stderr
    paths = [tmp_path / "c", *(tmp_path / "c").rglob("*")]
    assert any(p.suffix == ".safetensors" for p in paths)  # safetensors writes 0600 by itself
    for p in paths:
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p


def test_compose_force_refuses_an_out_holding_its_inputs(trained, tmp_path):
    models = f"image={trained['image-plain']},audio={trained['audio-plain']}"
    parent = trained["image-plain"].parent
    before = files_of(trained["image-plain"])
    done = run_mcomp("compose", "--models", models, "--out", str(parent), "--force")
    assert done.returncode != 0 and "write the output somewhere else" in done.stderr
    assert files_of(trained["image-plain"]) == before
