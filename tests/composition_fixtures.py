"""Tiny single-modality MLLMs trained for a few steps from one tiny base (shared by compose tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
PITCHES = {"low": 220.0, "mid": 440.0, "high": 880.0}


def sample(sample_id: str, modality: str, file: str, question: str, answer: str) -> dict:
    """One training sample about one media file, in the LLaVA format."""
    return {
        "id": sample_id,
        "modal_inputs": {modality: [file]},
        "conversations": [
            {"from": "human", "value": f"{modality}: <{modality}>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def write_image_data(root: Path) -> Path:
    items = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (40, 32), rgb).save(root / f"img{i}.png")
        items.append(sample(f"img{i}", "image", f"img{i}.png", "What colour is it?", name))
    path = root / "image_train.json"
    path.write_text(json.dumps(items))
    return path


def write_audio_data(root: Path) -> Path:
    items = []
    for i, (name, hz) in enumerate(PITCHES.items()):
        t = np.arange(8000) / 16000
        sf.write(root / f"aud{i}.wav", (0.4 * np.sin(2 * math.pi * hz * t)).astype(np.float32), 16000)
        items.append(sample(f"aud{i}", "audio", f"aud{i}.wav", "How high is the sound?", name))
    path = root / "audio_train.json"
    path.write_text(json.dumps(items))
    return path


def write_point_data(root: Path) -> Path:
    """Three random point clouds (xyz, colours in [0, 1]) named by a shape."""
    rng = np.random.default_rng(1)
    items = []
    for i, name in enumerate(("cube", "ball", "cone")):
        xyz, rgb = rng.normal(size=(300, 3)), rng.uniform(size=(300, 3))
        np.save(root / f"p{i}.npy", np.concatenate([xyz, rgb], axis=1).astype(np.float32))
        items.append(sample(f"p{i}", "point", f"p{i}.npy", "What shape is it?", name))
    path = root / "point_train.json"
    path.write_text(json.dumps(items))
    return path


def train_models(root: Path) -> dict[str, Path]:
    """image/audio x plain/decoupled, 4 steps each at a high learning rate (so LoRA B is non-zero)."""
    from mcomp.data import load_conversation_data
    from mcomp.model import MultimodalLM
    from mcomp.tiny import build_llm, build_tokenizer, tiny_audio_adapter_config, tiny_image_adapter_config
    from mcomp.train import TrainConfig, train

    tokenizer = build_tokenizer()
    data = {"image": write_image_data(root), "audio": write_audio_data(root)}
    adapters = {"image": tiny_image_adapter_config(), "audio": tiny_audio_adapter_config()}
    out = {}
    for modality in ("image", "audio"):
        samples = load_conversation_data(data[modality])
        for decoupled in (False, True):
            llm = build_llm(tokenizer, seed=0)  # the one shared base
            model = MultimodalLM.build(llm, tokenizer, [adapters[modality]])
            cfg = TrainConfig(
                stage=2,
                decoupled=decoupled,
                lora_r=4,
                lora_alpha=8,
                learning_rate=1e-2,
                max_steps=4,
                batch_size=3,
                seed=1 if modality == "image" else 2,
                log_every=0,
            )
            train(model, samples, cfg, root / f"ckpt-{modality}-{decoupled}")
            name = f"{modality}-{'damc' if decoupled else 'plain'}"
            model.save_pretrained(root / name)
            out[name] = root / name
    out["image_data"], out["audio_data"] = data["image"], data["audio"]
    return out
