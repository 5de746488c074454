"""Tiny configs of every built-in modality adapter and well-formed media files of every format they
read, shared by the suites that run over all adapters (`test_hostile_inputs`, `test_contracts`)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

from mcomp.benchmarks.mcub.synthetic import write_mp4, write_npy, write_png, write_wav
from mcomp.resources import load_config
from tests.interop_fixtures import LB_VISION

LANGUAGEBIND_TOWER = LB_VISION  # the tiny LanguageBind tower of the interop tests


def tiny_adapter_config(name: str) -> dict:
    from mcomp import tiny

    return {
        "image": lambda: tiny.tiny_image_adapter_config().to_dict(),
        "video": lambda: tiny.tiny_video_adapter_config().to_dict(),
        "audio": lambda: tiny.tiny_audio_adapter_config().to_dict(),
        "point": lambda: tiny.tiny_point_adapter_config().to_dict(),
        "audio-whisper": lambda: {
            "adapter": "audio-whisper",
            "encoder_config": load_config("encoders", "tiny-whisper.json"),
            "projector_type": "qformer_4N_1L",
            "qformer_hidden_size": 32,
            "qformer_num_heads": 4,
            "qformer_intermediate_size": 64,
            "qformer_max_positions": 50,
        },
        "video_languagebind": lambda: {"adapter": "video_languagebind", "tower_config": LANGUAGEBIND_TOWER},
        "llava_onevision_image": lambda: {
            "adapter": "llava_onevision_image",
            "tower_config": load_config("encoders", "tiny-siglip.json"),
            "image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]],
        },
        "llava_onevision_video": lambda: {
            "adapter": "llava_onevision_video",
            "tower_config": load_config("encoders", "tiny-siglip.json"),
            "num_frames": 4,
        },
    }[name]()


def write_good_files(root: Path) -> dict[str, Path]:
    """One well-formed file of every format the adapters read (several per modality)."""
    import open3d as o3d

    rng = np.random.default_rng(0)
    f = {
        ext: root / f"good{ext}"
        for ext in (".png", ".jpg", ".mp4", ".gif", ".wav", ".flac", ".m4a", ".npy", ".ply", ".pcd", ".webm")
    }
    write_png(f[".png"], rng)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f[".jpg"])
    write_mp4(f[".mp4"], rng, frames=10)
    f[".webm"].write_bytes(f[".mp4"].read_bytes())  # the container is told by its content
    frames = [Image.new("P", (16, 16), i) for i in range(3)]
    frames[0].save(f[".gif"], save_all=True, append_images=frames[1:], duration=100)
    write_wav(f[".wav"], rng)
    sf.write(f[".flac"], (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000, subtype="PCM_16")
    with av.open(str(f[".m4a"]), "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        for _ in range(8):
            frame = av.AudioFrame.from_ndarray(
                (0.1 * rng.standard_normal((1, 1024))).astype(np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    write_npy(f[".npy"], rng)
    cloud = o3d.geometry.PointCloud()
    cloud.points = o3d.utility.Vector3dVector(rng.normal(size=(300, 3)))
    o3d.io.write_point_cloud(str(f[".ply"]), cloud)
    o3d.io.write_point_cloud(str(f[".pcd"]), cloud)
    return f
