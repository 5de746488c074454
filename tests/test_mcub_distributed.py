"""`accelerate launch` with 2 CPU processes: samples are sharded, gathered on the main process, and the
results equal a single-process run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mcomp.benchmarks.mcub.records import read_records
from mcomp.benchmarks.mcub.runner import evaluate
from mcomp.benchmarks.mcub.synthetic import write_benchmark
from mcomp.benchmarks.mcub.tasks import load_task
from mcomp.commands.eval import build_tiny_model

TINY4 = "tiny:image,audio,video,point"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_two_processes_equal_one(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.is_file() and shutil.which("accelerate") is None:
        pytest.skip("accelerate's launcher is not installed")
    root = write_benchmark(tmp_path / "data", n=4, per_modality=2)
    run_dir = tmp_path / "dist"
    # `--multi_gpu` is accelerate's torchrun launcher (RANK/WORLD_SIZE per process); without a GPU the processes
    # join a gloo group on the CPU (`--device cpu`). (`--cpu --num_processes 2` starts one process unless mpirun
    # is configured.) A free port keeps concurrent runs apart.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(accelerate if accelerate.is_file() else shutil.which("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "mcomp.commands.eval",
        "--model",
        TINY4,
        "--task",
        "mcub4",
        "--data-root",
        str(root),
        "--mode",
        "loglik",
        "--out",
        str(run_dir),
        "--device",
        "cpu",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("mcub4 (loglik)") == 1  # only the main process reports
    dist = json.loads((run_dir / "results.json").read_text())
    assert dist["run"]["world_size"] == 2
    assert not list(run_dir.glob("samples.part-*"))  # shards merged into samples.jsonl

    single = evaluate(
        build_tiny_model(TINY4, seed=0), load_task("mcub4"), root, tmp_path / "single", mode="loglik", model_name=TINY4
    )
    assert dist["metrics"] == single["metrics"] and dist["results"] == single["results"]
    dist_records, single_records = (
        read_records(run_dir / "samples.jsonl"),
        read_records(tmp_path / "single" / "samples.jsonl"),
    )
    assert [r["id"] for r in dist_records] == [r["id"] for r in single_records]
    for a, b in zip(dist_records, single_records):
        assert a["prediction"] == b["prediction"] and a["correct"] == b["correct"]
        for x, y in zip(a["option_scores"], b["option_scores"]):
            assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-5)
