"""A tiny MLLM with all four adapters, on one prompt holding an image, an audio clip, a video and a
point cloud, each written to disk and decoded from there."""

from __future__ import annotations

import math

import av
import numpy as np
import open3d as o3d
import pytest
import soundfile as sf
import torch
from PIL import Image

from mcomp.errors import MediaBatchError
from mcomp.tiny import (
    build_tiny_mllm,
    tiny_audio_adapter_config,
    tiny_image_adapter_config,
    tiny_point_adapter_config,
    tiny_video_adapter_config,
)


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "img.png")
    t = np.arange(16000) / 16000
    sf.write(root / "clip.wav", (0.3 * np.sin(2 * math.pi * 440 * t)).astype(np.float32), 16000)
    with av.open(str(root / "clip.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(12):
            frame = np.full((32, 32, 3), 20 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    mesh = o3d.geometry.TriangleMesh.create_box()
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(mesh.vertices)))
    pcd.colors = o3d.utility.Vector3dVector(np.tile([[0.9, 0.1, 0.1]], (len(mesh.vertices), 1)))
    o3d.io.write_point_cloud(str(root / "cube.ply"), pcd)
    return {
        "image": root / "img.png",
        "audio": root / "clip.wav",
        "video": root / "clip.mp4",
        "point": root / "cube.ply",
    }


@pytest.fixture(scope="module")
def model():
    configs = [
        tiny_image_adapter_config(),
        tiny_audio_adapter_config(),
        tiny_video_adapter_config(),
        tiny_point_adapter_config(),
    ]
    return build_tiny_mllm(configs, seed=0)


def prompt(model):
    return model.template.prompt(
        "image: <image>\naudio: <audio>\nvideo: <video>\npoint: <point>\n"
        "What do all four inputs have in common?\nA. red\nB. blue\nC. loud\nD. round\n"
        "Answer with the option's letter from the given choices directly."
    )


def as_media(files):  # the released key for images is "vision"
    return {
        "vision": [str(files["image"])],
        "audio": [str(files["audio"])],
        "video": [str(files["video"])],
        "point": [str(files["point"])],
    }


def test_four_modalities_are_spliced_in_order(model, media_files):
    inputs = model.prepare_inputs([prompt(model)], [as_media(media_files)])
    ids = inputs.modality_ids[0].tolist()
    runs = []
    for k in ids:  # collapse consecutive positions into (modality id, length) runs
        if runs and runs[-1][0] == k:
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    modality_runs = [(model.modalities[k], n) for k, n in runs if k >= 0]
    assert modality_runs == [(m, model.adapters[m].num_tokens) for m in ("image", "audio", "video", "point")]
    for k, m in enumerate(model.modalities):  # each run holds exactly that adapter's projected features
        adapter = model.adapters[m]
        expected = adapter.project(adapter.encode(adapter.prepare([media_files[m]])))[0]
        torch.testing.assert_close(inputs.inputs_embeds[0, inputs.modality_ids[0] == k], expected)


def test_four_modalities_generate_and_score(model, media_files):
    answer = model.generate([prompt(model)], [as_media(media_files)], max_new_tokens=4)[0]
    assert isinstance(answer, str)
    scores = model.loglikelihood(prompt(model), [" A", " B", " C", " D"], as_media(media_files))
    assert len(scores) == 4 and all(s.num_tokens >= 1 and s.logprob < 0 for s in scores)
    # a different point cloud changes the scores: the point input really reaches the LLM
    other = dict(as_media(media_files), point=[str(media_files["point"]).replace("cube.ply", "other.ply")])
    pts = np.random.default_rng(0).normal(size=(100, 3))
    o3d.io.write_point_cloud(other["point"][0], o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts)))
    changed = model.loglikelihood(prompt(model), [" A", " B", " C", " D"], other)
    assert any(abs(a.logprob - b.logprob) > 1e-6 for a, b in zip(scores, changed))


def test_one_bad_file_among_four_modalities_is_named(model, media_files, tmp_path):
    empty = tmp_path / "silent.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    media = [as_media(media_files), dict(as_media(media_files), audio=[str(empty)])]
    with pytest.raises(MediaBatchError) as err:
        model.prepare_inputs([prompt(model)] * 2, media)
    assert list(err.value.failures) == [1] and "silent.wav" in str(err.value)
