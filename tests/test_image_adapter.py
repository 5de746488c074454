"""Image adapter: decoding from disk, pad-to-square, preprocessing and features vs independent code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from mcomp.encoders.image import CLIP_MEAN, CLIP_STD, ImageAdapter, expand_to_square
from mcomp.errors import MediaBatchError, MediaError
from mcomp.tiny import tiny_image_adapter_config


@pytest.fixture()
def adapter():
    torch.manual_seed(0)
    return ImageAdapter(tiny_image_adapter_config(), llm_hidden_size=64)


def test_png_and_jpeg_decode_from_disk(adapter, image_files):
    png = np.asarray(adapter.load(str(image_files["png"])))
    assert png.shape == (30, 48, 3)
    assert np.array_equal(png, image_files["pixels"])  # PNG is lossless
    jpg = np.asarray(adapter.load(str(image_files["jpg"]))).astype(float)
    assert jpg.shape == (30, 48, 3)
    assert np.abs(jpg - image_files["pixels"]).mean() < 20  # JPEG is lossy but close


def test_truncated_and_non_image_files_name_the_file(adapter, image_files, tmp_path):
    with pytest.raises(MediaError, match="truncated.png") as err:
        adapter.load(str(image_files["truncated"]))
    assert "corrupt or truncated" in str(err.value)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(MediaError, match="notes.txt.*not a recognised image"):
        adapter.load(str(text))
    with pytest.raises(MediaError, match="missing.png.*not found"):
        adapter.load(str(tmp_path / "missing.png"))


def test_batch_reports_exactly_the_bad_sample(adapter, image_files):
    with pytest.raises(MediaBatchError) as err:
        adapter.prepare([image_files["png"], image_files["truncated"], image_files["jpg"]])
    assert list(err.value.failures) == [1]
    assert "truncated.png" in str(err.value)


def test_pad_to_square_uses_mean_colour_and_floor_offsets(image_files):
    img = Image.fromarray(image_files["pixels"])  # 48 wide, 30 high
    sq = np.asarray(expand_to_square(img, CLIP_MEAN))
    assert sq.shape == (48, 48, 3)
    assert tuple(sq[0, 0]) == (122, 116, 104) and tuple(sq[47, 47]) == (122, 116, 104)
    top = (48 - 30) // 2
    assert np.array_equal(sq[top : top + 30], image_files["pixels"])
    assert (sq[top - 1] == (122, 116, 104)).all() and (sq[top + 30] == (122, 116, 104)).all()


def test_preprocess_matches_independent_pipeline(adapter, image_files):
    got = adapter.input_tensor(str(image_files["png"]))
    size = adapter.encoder.image_size
    padded = expand_to_square(Image.fromarray(image_files["pixels"]), CLIP_MEAN)
    ref = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )(padded)
    assert got.shape == (3, size, size)
    torch.testing.assert_close(got, ref)


def test_features_are_penultimate_layer_patch_tokens(adapter, image_files):
    pixels = adapter.prepare([image_files["png"], image_files["jpg"]])
    feats = adapter.encode(pixels)
    assert feats.shape == (2, adapter.num_tokens, adapter.encoder_dim) == (2, 16, 48)
    # Independent computation through the open_clip ViT: embeddings, ln_pre, all blocks but the last.
    v = adapter.encoder.visual
    x = v.conv1(pixels).flatten(2).transpose(1, 2)
    cls = v.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
    torch.testing.assert_close(feats, x[:, 1:])
    projected = adapter(pixels)
    proj = adapter.projector
    assert [type(m).__name__ for m in proj] == ["Linear", "GELU", "Linear"]
    assert set(proj.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    torch.testing.assert_close(projected, proj[2](torch.nn.functional.gelu(proj[0](feats))))
    assert projected.shape == (2, 16, 64)


def test_encoder_frozen_projector_trainable(adapter):
    assert not any(p.requires_grad for p in adapter.encoder.parameters())
    assert all(p.requires_grad for p in adapter.projector.parameters())
    adapter.train()
    assert not adapter.encoder.training
