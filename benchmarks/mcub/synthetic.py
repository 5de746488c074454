"""Small benchmark folders in the published schema, with real media files, for tests and benchmarks.

`write_benchmark(root)` writes, under `root`, the question and answer files of every shipped task at
the paths the task files expect (`data/test/...`), and the media they point to (PNG images via PIL,
MP4 videos via PyAV, WAV audio via soundfile, NPY point clouds), so `mcomp eval --data-root root`
runs on them. Content is random (seeded); the questions follow the published demo's prompt style.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np

from mcomp.benchmarks.mcub.data import answer_entry, question_entry
from mcomp.benchmarks.mcub.tasks import load_task
from mcomp.modalities import MODALITIES, ORDER

LETTERS = "ABCD"
TAG = {m: t.placeholder for m, t in MODALITIES.items()}
KEY = {m: t.published_key for m, t in MODALITIES.items()}  # modal_inputs keys as released
OBJECTS = ["a violin", "a motorcycle", "a dog", "a grand piano", "a guitar", "a car", "a bird", "a drum"]
OPEN_ANSWERS = ["two", "yes", "no", "Three.", "the guitar", "piano", "one", "zero"]


def write_png(path: Path, rng: np.random.Generator, size: int = 32) -> None:
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def write_wav(path: Path, rng: np.random.Generator, seconds: float = 0.5, rate: int = 16000) -> None:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t) + 0.05 * rng.standard_normal(t.shape)
    sf.write(str(path), tone.astype(np.float32), rate)


def write_mp4(path: Path, rng: np.random.Generator, frames: int = 10, size: int = 32) -> None:
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.height = stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for _ in range(frames):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_npy(path: Path, rng: np.random.Generator, points: int = 300) -> None:
    xyz = rng.uniform(-1, 1, (points, 3))
    rgb = rng.uniform(0, 1, (points, 3))
    np.save(path, np.concatenate([xyz, rgb], axis=1).astype(np.float32))


def write_media(root: Path, per_modality: int = 3, seed: int = 0) -> dict[str, list[str]]:
    """`per_modality` files of each modality; returns data-root-relative paths (as the released jsons hold)."""
    rng = np.random.default_rng(seed)
    writers = {
        "image": ("img", ".png", write_png),
        "audio": ("aud", ".wav", write_wav),
        "video": ("vid", ".mp4", write_mp4),
        "point": ("pcl", ".npy", write_npy),
    }
    out = {}
    for modality, (folder, ext, write) in writers.items():
        d = root / "data" / "media" / folder
        d.mkdir(parents=True, exist_ok=True)
        rel = []
        for i in range(per_modality):
            path = d / f"{i:04d}{ext}"
            write(path, rng)
            rel.append(os.path.relpath(path, root))
        out[modality] = rel
    return out


def _question(modalities, body: str) -> str:
    return "\n".join([f"{m}: {TAG[m]}" for m in ORDER if m in modalities] + [body])


def _choice_body(rnd: random.Random) -> tuple[str, str]:
    options = rnd.sample(OBJECTS, 4)
    lines = [f"{letter}. {text}" for letter, text in zip(LETTERS, options)]
    body = "\n".join(
        [
            "What object do all the inputs have in common?",
            *lines,
            "Answer with the option's letter from the given choices directly.",
        ]
    )
    return body, rnd.choice(LETTERS)


def _entry(sample_id, question: str, modalities, media, rnd: random.Random) -> dict:
    return question_entry(sample_id, question, {KEY[m]: [rnd.choice(media[m])] for m in ORDER if m in modalities})


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def write_benchmark(
    root: str | os.PathLike, n: int = 4, seed: int = 0, per_modality: int = 3, class_names: list[str] | None = None
) -> Path:
    """All shipped tasks' files under `root` (n samples per subset); returns `root`."""
    root = Path(root)
    rnd = random.Random(seed)
    media = write_media(root, per_modality, seed)

    mcub_answers = []
    mcub = [load_task("mcub4"), load_task("mcub3")]
    for subset in (s for task in mcub for s in task.subsets):
        entries = []
        for i in range(n):
            body, letter = _choice_body(rnd)
            sid = f"{Path(subset.questions).stem.lower()}_{i:04d}"
            q = _question(subset.modalities, body)
            entries.append(_entry(sid, q, subset.modalities, media, rnd))
            mcub_answers.append(answer_entry(sid, q, letter))
        _dump(root / subset.questions, entries)
    _dump(root / mcub[0].answers, mcub_answers)

    for task, open_ended in ((load_task("avqa"), False), (load_task("music_avqa"), True)):
        answers = []
        for k, (subset, modalities) in enumerate((s.name, s.modalities) for s in task.subsets):
            entries = []
            for i in range(n):
                if open_ended:
                    body, ans = "How many instruments are sounding in the performance?", rnd.choice(OPEN_ANSWERS)
                else:
                    body, ans = _choice_body(rnd)
                sid = f"{subset}-{i}" if open_ended else 100 * k + i  # AVQA: integer ids
                q = _question(modalities, body)
                entries.append(_entry(sid, q, modalities, media, rnd))
                answers.append(answer_entry(sid, q, ans))
            _dump(root / task.subsets[k].questions, entries)
        _dump(root / task.answers, answers)

    if class_names:
        entries, annotations = [], []
        for i in range(n):
            label = rnd.randrange(len(class_names))
            sid = f"modelnet_{i:04d}"
            entries.append(_entry(sid, _question(("point",), "What is this?"), ("point",), media, rnd))
            annotations.append({"id": sid, "label": label, "label_name": class_names[label]})
        modelnet = load_task("modelnet40")
        _dump(root / modelnet.subsets[0].questions, entries)
        _dump(root / modelnet.answers, annotations)
    return root
