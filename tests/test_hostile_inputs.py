"""Hostile media and task files are data: real files on disk that must fail their own sample, and
task files that must not run code. Decompression bombs, truncated and garbage files for every
adapter, media paths that leave the data root, task files that name Python code."""

from __future__ import annotations

import json
import logging
import struct
import sys
import uuid
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mcomp import cli
from mcomp.benchmarks.mcub.data import read_questions
from mcomp.benchmarks.mcub.records import read_records
from mcomp.benchmarks.mcub.registry import resolve
from mcomp.benchmarks.mcub.scoring import exact
from mcomp.benchmarks.mcub.synthetic import write_mp4, write_png, write_wav
from mcomp.benchmarks.mcub.tasks import load_task, parse_task
from mcomp.encoders import audio as audio_module
from mcomp.encoders import point as point_module
from mcomp.errors import MediaBatchError, MediaError
from mcomp.modality import AdapterConfig, ModalityAdapter, available_adapters, build_adapter
from tests.adapter_fixtures import tiny_adapter_config, write_good_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- files --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 1-bit PNG whose header declares 15000 x 15000 pixels: tiny on disk, 675 MB as RGB."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (15000, 15000)).save(path)
    assert path.stat().st_size < 64_000
    with open(path, "rb") as f:
        assert struct.unpack(">II", f.read(24)[16:24]) == (15000, 15000)  # IHDR width, height
    return path


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- decompression bombs --------------------------------------------------------------------------
def _image_adapter():
    from mcomp.tiny import tiny_image_adapter_config

    torch.manual_seed(0)
    return build_adapter(tiny_image_adapter_config().to_dict(), 64)


def test_bomb_png_is_a_media_error_naming_the_file(bomb):
    adapter = _image_adapter()
    with pytest.raises(MediaError, match=r"bomb\.png.*image of 225000000 pixels exceeds the decompression-bomb") as err:
        adapter.input_tensor(str(bomb))
    assert err.value.path == str(bomb) and err.value.modality == "image"
    with pytest.raises(MediaError, match="bomb.png"):
        adapter.load(str(bomb))  # the decoder itself, not only the base class
    with pytest.raises(MediaBatchError) as batch:
        adapter.prepare([str(bomb)])
    assert list(batch.value.failures) == [0]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_between_the_limit_and_twice_it_pillow_only_warns_but_it_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(path)  # 1200 pixels
    adapter = _image_adapter()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 is in Pillow's warning range (1000, 2000]
    with pytest.raises(
        MediaError,
        match=r"big\.png.*image of 40 x 30 pixels exceeds the decompression-bomb limit "
        r"of 1000 pixels \(PIL\.Image\.MAX_IMAGE_PIXELS",
    ):
        adapter.input_tensor(str(path))
    with warnings.catch_warnings():  # python -W error: the warning is raised as an exception
        warnings.simplefilter("error")
        with pytest.raises(MediaError, match=r"big\.png.*decompression-bomb limit"):
            adapter.input_tensor(str(path))
    # a long thin image within the limit whose square canvas (pad) is not
    thin = tmp_path / "thin.png"
    Image.new("RGB", (90, 10)).save(thin)
    with pytest.raises(MediaError, match=r"thin\.png.*padding it to a square gives 90 x 90 pixels"):
        adapter.input_tensor(str(thin))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the user raised the limit: accepted
    assert adapter.input_tensor(str(path)).shape == (3, 32, 32)
    assert adapter.input_tensor(str(thin)).shape == (3, 32, 32)


def test_video_with_huge_declared_frames_is_refused_before_decoding(tmp_path, monkeypatch):
    from mcomp.encoders.video import VideoAdapter
    from mcomp.tiny import tiny_video_adapter_config

    small = tmp_path / "small.gif"
    frames = [Image.new("P", (4, 4), i) for i in range(3)]
    frames[0].save(small, save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = bytearray(small.read_bytes())
    data[6:10] = struct.pack("<HH", 8000, 8000)  # the logical screen: 8 frames of 64 M pixels
    huge = tmp_path / "huge.gif"
    huge.write_bytes(bytes(data))
    assert huge.stat().st_size < 200
    adapter = VideoAdapter(tiny_video_adapter_config(), 64)
    with pytest.raises(MediaError, match=r"huge\.gif.*8 frames of 8000 x 8000 pixels exceed the decompression-bomb"):
        adapter.input_tensor(str(huge))
    clip = tmp_path / "clip.mp4"
    write_mp4(clip, np.random.default_rng(0), frames=4, size=32)
    assert adapter.input_tensor(str(clip)).shape == (8, 3, 32, 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8 * 32 * 32 - 1)  # the same limit bounds every clip
    with pytest.raises(MediaError, match=r"clip\.mp4.*8 frames of 32 x 32 pixels"):
        adapter.input_tensor(str(clip))


def test_audio_and_point_files_that_declare_more_than_the_limits(tmp_path, monkeypatch):
    from mcomp.tiny import tiny_audio_adapter_config, tiny_point_adapter_config

    wav, clip = tmp_path / "tone.wav", tmp_path / "tone.mp4"
    write_wav(wav, np.random.default_rng(0), seconds=0.5)
    audio = build_adapter(tiny_audio_adapter_config().to_dict(), 64)
    monkeypatch.setattr(audio_module, "MAX_AUDIO_SAMPLES", 4000)
    with pytest.raises(MediaError, match=r"tone\.wav.*the header declares 8000 x 1 samples, over the limit of 4000"):
        audio.input_tensor(str(wav))
    with av.open(str(clip), "w") as out:  # a container's length is known only by decoding it
        stream = out.add_stream("aac", rate=16000)
        for _ in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(MediaError, match=r"tone\.mp4.*the audio decodes to at least \d+ samples, over the limit"):
        audio.input_tensor(str(clip))

    point = build_adapter(tiny_point_adapter_config().to_dict(), 64)
    header = (
        "ply\nformat binary_little_endian 1.0\nelement vertex {n}\nproperty float x\nproperty float y\n"
        "property float z\nend_header\n"
    )
    over = tmp_path / "billion.ply"  # a few bytes that open3d would allocate 24 GB for
    over.write_bytes(header.format(n=1_000_000_000).encode() + bytes(120))
    with pytest.raises(MediaError, match=r"billion\.ply.*declares 1000000000 points, over the limit"):
        point.input_tensor(str(over))
    short = tmp_path / "short.ply"
    short.write_bytes(header.format(n=5_000_000).encode() + bytes(120))
    with pytest.raises(MediaError, match=r"short\.ply.*declares 5000000 points \(at least 60000000 bytes\)"):
        point.input_tensor(str(short))
    npy = tmp_path / "short.npy"  # np.load would allocate the declared 72 GB before reading
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (3_000_000_000, 6)})
        f.write(bytes(240))
    with pytest.raises(
        MediaError,
        match=r"short\.npy.*corrupt or truncated \.npy file: the header declares shape "
        r"\(3000000000, 6\) of float32 \(72000000000 bytes\) but the file holds 240",
    ):
        point.input_tensor(str(npy))
    monkeypatch.setattr(point_module, "MAX_POINTS", 100)
    pts = tmp_path / "cloud.pts"
    pts.write_text("300\n" + "0 0 0\n" * 300)
    with pytest.raises(MediaError, match=r"cloud\.pts.*declares 300 points, over the limit of 100"):
        point.input_tensor(str(pts))


# --- every adapter: truncated and garbage files ---------------------------------------------------
# (good file, bad files) by adapter; a truncated WAV is not here: libsndfile decodes the samples present,
# as it does for a WAV written by a streaming tool whose header was never filled in.
FILES = {
    "image": (".png", [("trunc", ".png"), ("trunc", ".jpg"), ("garbage", ".png"), ("empty", ".jpg")]),
    "video": (".mp4", [("trunc", ".mp4"), ("garbage", ".mp4"), ("trunc", ".gif"), ("trunc", ".png")]),
    "video_languagebind": (".mp4", [("trunc", ".mp4"), ("garbage", ".webm")]),
    "llava_onevision_image": (".png", [("trunc", ".png"), ("garbage", ".jpg"), ("empty", ".png")]),
    "llava_onevision_video": (".mp4", [("trunc", ".mp4"), ("garbage", ".mp4"), ("trunc", ".gif")]),
    "audio": (".wav", [("trunc", ".flac"), ("garbage", ".wav"), ("trunc", ".m4a"), ("empty", ".flac")]),
    "audio-whisper": (".wav", [("trunc", ".flac"), ("garbage", ".mp4")]),
    "point": (
        ".npy",
        [("trunc", ".npy"), ("garbage", ".npy"), ("trunc", ".ply"), ("garbage", ".ply"), ("trunc", ".pcd")],
    ),
}


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> dict[str, Path]:
    return write_good_files(tmp_path_factory.mktemp("good"))


def test_every_built_in_adapter_is_covered():
    built_in = {name for name, cls in available_adapters().items() if cls.__module__.startswith("mcomp.encoders.")}
    assert built_in == set(FILES)


@pytest.mark.parametrize("name", sorted(FILES))
def test_truncated_and_garbage_files_are_media_errors_naming_the_file(name, good_files, tmp_path):
    torch.manual_seed(0)
    adapter = build_adapter(tiny_adapter_config(name), 64)
    good_ext, bad = FILES[name]
    rng = np.random.default_rng(1)
    paths = []
    for kind, ext in bad:
        data = good_files[ext].read_bytes()
        content = {"trunc": data[: len(data) * 2 // 5], "garbage": rng.bytes(2000), "empty": b""}[kind]
        path = tmp_path / f"{kind}_{name}{ext}"
        path.write_bytes(content)
        paths.append(path)
        with pytest.raises(MediaError) as err:
            adapter.input_tensor(str(path))
        assert err.value.path == str(path) and err.value.modality == adapter.modality
        assert path.name in str(err.value)
    good = str(good_files[good_ext])
    with pytest.raises(MediaBatchError) as batch:  # the good files of the batch are fine
        adapter.prepare([good, *map(str, paths), good])
    assert list(batch.value.failures) == list(range(1, len(paths) + 1))
    assert adapter.prepare([good]).shape[0] == 1


class _FlakyAdapter(ModalityAdapter):
    """A plug-in whose decoder raises its own exceptions, as third-party decoders do."""

    modality = "flaky"
    placeholder = "<flaky>"
    raise_in_load: BaseException | None = None

    def build_encoder(self):
        return torch.nn.Linear(1, 4)

    @property
    def encoder_dim(self) -> int:
        return 4

    def load(self, path: str):
        if self.raise_in_load is not None:
            raise self.raise_in_load
        return Path(path).read_bytes()

    def preprocess(self, raw) -> torch.Tensor:
        return torch.tensor([1.0 / (len(raw) - len(raw))])  # ZeroDivisionError: a bug in its preprocessing


def test_a_plug_in_adapters_own_exceptions_become_media_errors(tmp_path):
    path = tmp_path / "thing.bin"
    path.write_bytes(b"abc")
    adapter = _FlakyAdapter(AdapterConfig(adapter="flaky"), 8)
    with pytest.raises(
        MediaError,
        match=r"cannot use flaky input '.*thing\.bin': preprocessing failed "
        r"\(ZeroDivisionError",
    ) as err:
        adapter.input_tensor(str(path))
    assert err.value.path == str(path)
    adapter.raise_in_load = struct.error("unpack requires a buffer of 4 bytes")
    with pytest.raises(MediaError, match=r"thing\.bin': cannot decode \(error: unpack requires"):
        adapter.input_tensor(str(path))
    with pytest.raises(MediaBatchError):
        adapter.prepare([str(path)])
    for fatal in (MemoryError(), KeyboardInterrupt()):  # not the file's fault: they stop the run
        adapter.raise_in_load = fatal
        with pytest.raises(type(fatal)):
            adapter.prepare([str(path)])


# --- mcomp eval and mcomp ask -------------------------------------------------------------------
QUESTION = (
    "image: <image>\nWhat object is shown?\nA. a dog\nB. a car\nC. a bird\nD. a drum\n"
    "Answer with the option's letter from the given choices directly."
)


def _image_dataset(root: Path, n: int = 4) -> tuple[Path, Path]:
    """n PNG samples in the published schema under `root`: (question file, answer file)."""
    rng = np.random.default_rng(0)
    (root / "media").mkdir(parents=True)
    questions, answers = [], []
    for i in range(n):
        write_png(root / "media" / f"{i}.png", rng)
        turns = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": None}]
        questions.append({"id": i, "conversations": turns, "modal_inputs": {"vision": [f"media/{i}.png"]}})
        answers.append({"id": i, "conversations": [turns[0], {"from": "gpt", "value": "ABCD"[i % 4]}]})
    (root / "q.json").write_text(json.dumps(questions))
    (root / "a.json").write_text(json.dumps(answers))
    return root / "q.json", root / "a.json"


def _set_media(question_file: Path, changes: dict[int, str]) -> None:
    entries = json.loads(question_file.read_text())
    for i, path in changes.items():
        entries[i]["modal_inputs"]["vision"] = [path]
    question_file.write_text(json.dumps(entries))


def _eval_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--model",
        "tiny:image",
        "--task",
        "avqa",
        "--subset",
        "image",
        "--data-root",
        str(root),
        "--questions",
        str(root / "q.json"),
        "--answers",
        str(root / "a.json"),
        "--mode",
        "generate",
        "--max-new-tokens",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def test_eval_records_the_bomb_as_that_samples_error_and_goes_on(bomb, tmp_path, capsys, caplog):
    root = tmp_path / "data"
    questions, _ = _image_dataset(root)
    (root / "media" / "bomb.png").write_bytes(bomb.read_bytes())
    _set_media(questions, {1: "media/bomb.png"})
    argv = _eval_argv(root, tmp_path / "run")
    caplog.set_level(logging.WARNING)
    code, out, err = _run_cli(argv, capsys)
    assert code == 0, err
    records = read_records(tmp_path / "run" / "samples.jsonl")
    assert [r["id"] for r in records] == [0, 1, 2, 3]
    assert "bomb.png" in records[1]["error"] and "decompression-bomb limit" in records[1]["error"]
    assert records[1]["correct"] is False and records[1]["response"] is None
    for r in records[:1] + records[2:]:
        assert r["error"] is None and isinstance(r["response"], str)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"][0]["n_errors"] == 1 and results["metrics"][0]["n_samples"] == 4
    assert any("bomb.png" in rec.getMessage() for rec in caplog.records)

    samples_bytes = (tmp_path / "run" / "samples.jsonl").read_bytes()
    caplog.clear()
    code, out, err = _run_cli(argv, capsys)  # rerun: every sample is done, nothing is evaluated again
    assert code == 0, err
    assert not any("bomb.png" in rec.getMessage() for rec in caplog.records)
    assert (tmp_path / "run" / "samples.jsonl").read_bytes() == samples_bytes
    assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"] == results["metrics"]
    assert not list((tmp_path / "run").glob("samples.part-*"))


def test_ask_with_the_bomb_exits_non_zero_naming_the_file(bomb, capsys):
    code, out, err = _run_cli(["ask", "--tiny", "--media", f"image={bomb}", "What is shown?"], capsys)
    assert code != 0 and "answer:" not in out
    assert str(bomb) in err and "decompression-bomb limit" in err and "Traceback" not in err


# --- media paths leave the data root --------------------------------------------------------------
def test_media_outside_the_data_root_fails_that_sample_unless_allowed(tmp_path, capsys):
    root = tmp_path / "data"
    questions, _ = _image_dataset(root, n=6)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_png(outside / "secret.png", np.random.default_rng(5))
    (root / "media" / "link.png").symlink_to(outside / "secret.png")
    (root / "media" / "inner.png").symlink_to(root / "media" / "5.png")  # a link that stays inside is fine
    escapes = {0: "../elsewhere/secret.png", 1: str(outside / "secret.png"), 2: "media/link.png"}
    _set_media(questions, {**escapes, 4: "media/inner.png"})

    samples = read_questions(questions, "image", root)
    for i, written in escapes.items():
        assert "outside the data root" in samples[i].error and written in samples[i].error
        assert str((outside / "secret.png").resolve()) in samples[i].error
    assert [s.error for s in samples[3:]] == [None, None, None]
    assert all(s.error is None for s in read_questions(questions, "image", root, allow_outside_root=True))

    code, _, err = _run_cli(_eval_argv(root, tmp_path / "confined"), capsys)
    assert code == 0, err
    records = read_records(tmp_path / "confined" / "samples.jsonl")
    for i, written in escapes.items():
        assert written in records[i]["error"] and "--allow-media-outside-root" in records[i]["error"]
        assert records[i]["response"] is None
    assert all(r["error"] is None and isinstance(r["response"], str) for r in records[3:])

    code, _, err = _run_cli(_eval_argv(root, tmp_path / "allowed", "--allow-media-outside-root"), capsys)
    assert code == 0, err
    records = read_records(tmp_path / "allowed" / "samples.jsonl")
    assert all(r["error"] is None and isinstance(r["response"], str) for r in records)


# --- task files are data --------------------------------------------------------------------------
def _helper_module(tmp_path: Path, monkeypatch) -> tuple[str, Path]:
    """A module of our own whose import leaves a marker file: proof of whether anything ran."""
    name = f"hostile_helper_{uuid.uuid4().hex[:12]}"
    marker = tmp_path / f"{name}.imported"
    (tmp_path / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n\n"
        "def score(value, target):\n    return value, True\n\n"
        "def options(sample, state, **_):\n    return []\n\n"
        "def target(entry, **_):\n    return entry['conversations'][-1]['value']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, marker


def _task(**changes) -> dict:
    task = {
        "name": "mine",
        "answers": "a.json",
        "subsets": [{"name": "image", "questions": "q.json", "modalities": ["image"]}],
        "modes": {"generate": {"scorer": "first_letter", "max_new_tokens": 1}},
    }
    task.update(changes)
    return task


def _write_task(path: Path, task: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(task))
    return path


@pytest.mark.parametrize("field", ["scorer", "options", "target", "functions"])
def test_a_task_file_naming_code_is_refused_before_anything_runs(field, tmp_path, monkeypatch):
    name, marker = _helper_module(tmp_path, monkeypatch)
    task = {
        "scorer": lambda: _task(modes={"generate": {"scorer": f"{name}:score"}}),
        "options": lambda: _task(modes={"loglik": {"scorer": "exact", "options": {"function": f"{name}:options"}}}),
        "target": lambda: _task(target={"function": f"{name}:target"}),
        "functions": lambda: _task(functions=[name]),
    }[field]()
    path = _write_task(tmp_path / "mine.yaml", task)
    with pytest.raises(ValueError) as err:
        load_task(str(path))
    message = str(err.value)
    assert str(path) in message and name in message and "--allow-task-code" in message
    assert {
        "scorer": "modes.generate: scorer",
        "options": "modes.loglik: options",
        "target": "target: target",
        "functions": "functions",
    }[field] in message
    assert not marker.exists() and name not in sys.modules  # nothing was imported, nothing ran
    load_task(str(path), allow_code=True)  # the user's explicit choice
    assert marker.exists() and name in sys.modules


def test_subprocess_run_and_os_are_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"t\.yaml: modes\.generate: scorer 'subprocess:run' is Python code "
        r"\(module:function\).*--allow-task-code",
    ):
        parse_task(_task(modes={"generate": {"scorer": "subprocess:run"}}), "t.yaml")
    with pytest.raises(ValueError, match=r"t\.yaml: functions lists the Python module\(s\) \['os'\].*--allow-task"):
        parse_task(_task(functions=["os"]), "t.yaml")
    # a registered function may be named by its full path: nothing is imported for it
    task = parse_task(_task(modes={"generate": {"scorer": "mcomp.benchmarks.mcub.scoring:exact"}}), "t.yaml")
    assert task.resolve("scorer", "mcomp.benchmarks.mcub.scoring:exact") is exact
    assert resolve("scorer", "mcomp.benchmarks.mcub.scoring:exact") is exact


def test_shipped_tasks_need_no_code():
    from mcomp.benchmarks.mcub.tasks import available_tasks

    for name in available_tasks():
        task = load_task(name)
        assert not task.raw.get("functions") and not task.allow_code


def test_allow_task_code_runs_a_legitimate_module_function(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    _image_dataset(root)
    name, marker = _helper_module(tmp_path, monkeypatch)
    path = _write_task(
        tmp_path / "mine.yaml", _task(modes={"generate": {"scorer": f"{name}:score", "max_new_tokens": 1}})
    )
    argv = ["eval", "--model", "tiny:image", "--task", str(path), "--data-root", str(root), "--out"]
    code, _, err = _run_cli(argv + [str(tmp_path / "refused")], capsys)
    assert code == 1 and f"{name}:score" in err and "--allow-task-code" in err and str(path) in err
    assert not marker.exists() and not (tmp_path / "refused").exists()
    code, out, err = _run_cli(argv + [str(tmp_path / "run"), "--allow-task-code"], capsys)
    assert code == 0, err
    assert marker.exists()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"][0]["value"] == 100.0 and results["metrics"][0]["n_samples"] == 4
