"""Video adapter: real mp4/webm/avi/gif files decoded with PyAV, frame sampling, tokens, bad files."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from mcomp.encoders.image import CLIP_MEAN, CLIP_STD
from mcomp.encoders.video import VideoAdapter, VideoAdapterConfig, frame_indices
from mcomp.errors import MediaBatchError, MediaError
from mcomp.tiny import tiny_video_adapter_config

N_FRAMES = 20


def frame_colour(i: int) -> tuple[int, int, int]:
    return (12 * i + 10, 240 - 11 * i, 128)


def write_video(path, codec: str, n: int = N_FRAMES, size=(48, 64), pix_fmt="yuv420p", fmt=None):
    """Frame i is a solid colour that encodes i, so the decoded frame identifies its index."""
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "0", "preset": "ultrafast"}
        for i in range(n):
            img = np.zeros((*size, 3), dtype=np.uint8)
            img[:] = frame_colour(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    files = {
        "mp4": (root / "clip.mp4", "libx264", "yuv420p"),
        "webm": (root / "clip.webm", "libvpx", "yuv420p"),
        "avi": (root / "clip.avi", "mjpeg", "yuvj420p"),
        "gif": (root / "clip.gif", "gif", "rgb8"),
    }
    for path, codec, pix in files.values():
        write_video(path, codec, pix_fmt=pix)
    return {k: v[0] for k, v in files.items()}


@pytest.fixture()
def adapter():
    torch.manual_seed(0)
    return VideoAdapter(tiny_video_adapter_config(), llm_hidden_size=64)


@pytest.mark.parametrize("kind", ["mp4", "webm", "avi", "gif"])
def test_uniform_frames_decoded_from_disk(adapter, videos, kind):
    frames = adapter.load(str(videos[kind]))
    assert len(frames) == 8 and frames[0].shape == (48, 64, 3)
    expected = frame_indices(N_FRAMES, 8)
    assert expected == [0, 2, 5, 8, 10, 13, 16, 19]
    palette = np.array([frame_colour(i) for i in range(N_FRAMES)], dtype=float)
    for frame, i in zip(frames, expected):  # lossy codecs: identify each frame by its nearest colour
        got = frame.reshape(-1, 3).mean(0)
        nearest = int(np.argmin(((palette - got)[:, :2] ** 2).sum(1)))
        assert nearest == i, (kind, i, got)


def test_still_image_is_one_frame_of_tokens(adapter, tmp_path, videos):
    """Published evaluation (LanguageBind's image path): a still image given as a video input stays
    one frame, [C, 1, H, W], so it brings one frame's tokens, not num_frames copies; in a batch with
    videos it keeps them (features as when encoded alone)."""
    path = tmp_path / "still.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(path)
    frames = adapter.load(str(path))
    assert len(frames) == 1 and frames[0].shape == (30, 40, 3)
    size = adapter.encoder.image_size
    assert adapter.input_tensor(str(path)).shape == (1, 3, size, size)
    alone = adapter.encode_tensors(adapter.input_tensors([str(path)]))[0]
    assert alone.shape[0] == adapter.tokens_per_frame == adapter.num_tokens // 8
    mixed = adapter.encode_tensors(adapter.input_tensors([str(videos["mp4"]), str(path), str(videos["webm"])]))
    assert [f.shape[0] for f in mixed] == [adapter.num_tokens, adapter.tokens_per_frame, adapter.num_tokens]
    torch.testing.assert_close(mixed[1], alone)
    eight = adapter.encode(adapter.input_tensor(str(path)).expand(8, -1, -1, -1)[None])[0]
    torch.testing.assert_close(eight[: adapter.tokens_per_frame], alone)  # the open_clip tower: frames apart


def test_preprocess_matches_independent_pipeline(adapter, videos):
    frames = adapter.load(str(videos["mp4"]))
    got = adapter.preprocess(frames)
    size = adapter.encoder.image_size
    ref = []
    for f in frames:
        t = torch.from_numpy(f).permute(2, 0, 1).float() / 255
        t = TF.resize(t, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        t = TF.center_crop(t, size)
        ref.append(TF.normalize(t, CLIP_MEAN, CLIP_STD))
    torch.testing.assert_close(got, torch.stack(ref), atol=1e-5, rtol=1e-5)
    assert got.shape == (8, 3, size, size)


def test_tokens_are_frame_major_with_cls(adapter, videos):
    batch = adapter.prepare([videos["mp4"], videos["webm"]])
    feats = adapter.encode(batch)
    per_frame = 1 + adapter.encoder.num_patches
    assert adapter.num_tokens == 8 * per_frame == feats.shape[1]
    frame3 = adapter.encoder(batch[1, 3:4], -2)[0]  # tower output of frame 3 of sample 1, CLS first
    torch.testing.assert_close(feats[1, 3 * per_frame : 4 * per_frame], frame3)
    assert adapter(batch).shape == (2, adapter.num_tokens, 64)


def test_time_and_space_pooling_cut_tokens(videos):
    torch.manual_seed(0)
    base = VideoAdapter(tiny_video_adapter_config(), 64)
    batch = base.prepare([videos["mp4"]])
    full = base.encode(batch).view(1, 8, 17, -1)
    timed = VideoAdapter(tiny_video_adapter_config(pool="time", pool_size=4), 64)
    timed.encoder.load_state_dict(base.encoder.state_dict())
    t = timed.encode(batch)
    assert timed.num_tokens == 2 * 17 == t.shape[1]
    torch.testing.assert_close(t.view(1, 2, 17, -1), full.view(1, 2, 4, 17, -1).mean(2))
    spaced = VideoAdapter(tiny_video_adapter_config(pool="space", pool_size=2), 64)
    spaced.encoder.load_state_dict(base.encoder.state_dict())
    s = spaced.encode(batch).view(1, 8, 5, -1)
    assert spaced.num_tokens == 8 * 5
    torch.testing.assert_close(s[:, :, 0], full[:, :, 0])  # CLS kept as is
    grid = full[:, :, 1:].view(1, 8, 4, 4, -1)
    torch.testing.assert_close(s[:, :, 1], grid[:, :, :2, :2].mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="must divide num_frames"):
        VideoAdapterConfig(pool="time", pool_size=3)


def test_bad_videos_name_the_file(adapter, tmp_path, videos):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x01not a video" * 100)
    with pytest.raises(MediaError, match="junk.mp4"):
        adapter.load(str(junk))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(MediaError, match="notes.txt.*unsupported video extension"):
        adapter.load(str(notes))
    audio_only = tmp_path / "audio_only.mp4"
    with av.open(str(audio_only), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in stream.encode(frame):
            out.mux(p)
        for p in stream.encode():
            out.mux(p)
    with pytest.raises(MediaError, match="audio_only.mp4.*no video stream"):
        adapter.load(str(audio_only))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty.mp4"):
        adapter.load(str(empty))
    with pytest.raises(MediaBatchError) as err:
        adapter.prepare([videos["mp4"], junk, videos["gif"], notes])
    assert list(err.value.failures) == [1, 3]


@pytest.mark.parametrize("height,width", [(480, 640), (198, 242), (640, 480), (720, 1280), (300, 300), (97, 131)])
def test_resize_and_crop_follow_the_published_transforms(adapter, height, width):
    """Published (spec §6.3): pytorchvideo ShortSideScale gives the long side floor(long / short * S),
    bilinear without antialiasing (its rule, written out here: pytorchvideo is not installed); then
    torchvision's CenterCropVideo itself, offsets int(round((h - S) / 2))."""
    from torchvision.transforms._functional_video import center_crop as center_crop_video

    g = torch.Generator().manual_seed(height * width)
    frames = [torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy() for _ in range(8)]
    size = adapter.encoder.image_size
    clip = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 255  # [C, T, H, W], as released
    if width < height:
        new_h, new_w = int(math.floor((float(height) / width) * size)), size
    else:
        new_h, new_w = size, int(math.floor((float(width) / height) * size))
    clip = torch.nn.functional.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)
    clip = center_crop_video(clip, (size, size))  # torchvision's own CenterCropVideo
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    published = ((clip - mean) / std).permute(1, 0, 2, 3)  # [T, C, S, S]
    torch.testing.assert_close(adapter.preprocess(frames), published, atol=1e-6, rtol=1e-6)


def test_model_splices_one_frame_of_tokens_for_a_still(tmp_path, videos):
    from mcomp.tiny import build_tiny_mllm

    model = build_tiny_mllm([tiny_video_adapter_config()], seed=0)
    still = tmp_path / "still.jpg"
    Image.new("RGB", (40, 30), (200, 20, 30)).save(still)
    prompt = model.template.prompt("<video> What is it?")
    inputs = model.prepare_inputs([prompt, prompt], [{"video": str(still)}, {"video": str(videos["mp4"])}])
    per_frame = model.adapters["video"].tokens_per_frame
    assert (inputs.modality_ids == 0).sum(dim=1).tolist() == [per_frame, 8 * per_frame]


def test_flip_option_is_the_released_random_flip(videos):
    """flip_probability restores the released RandomHorizontalFlipVideo (here p = 1, the rule itself
    from torchvision, on the [C, T, H, W] clip); at p = 0.5 about half the clips flip, each file
    always the same way."""
    from torchvision.transforms._transforms_video import RandomHorizontalFlipVideo

    plain = VideoAdapter(tiny_video_adapter_config(), llm_hidden_size=64)
    flipping = VideoAdapter(tiny_video_adapter_config(flip_probability=1.0), llm_hidden_size=64)
    frames = plain.load(str(videos["mp4"]))
    want = RandomHorizontalFlipVideo(p=1.0)(plain.preprocess(frames).permute(1, 0, 2, 3)).permute(1, 0, 2, 3)
    torch.testing.assert_close(flipping.preprocess(frames), want)
    half = VideoAdapter(tiny_video_adapter_config(flip_probability=0.5, flip_seed=3), llm_hidden_size=64)
    clips = [[np.full((12, 16, 3), k, np.uint8), np.full((12, 16, 3), 255 - k, np.uint8)] * 4 for k in range(40)]
    for k in range(40):  # ramps, so a flip shows
        for f in clips[k]:
            f[:, :, 0] = np.arange(16, dtype=np.uint8) * 8 + k
    flipped = [not torch.equal(half.preprocess(c), plain.preprocess(c)) for c in clips]
    assert 10 < sum(flipped) < 30
    assert flipped == [not torch.equal(half.preprocess(c), plain.preprocess(c)) for c in clips]
