"""Default (published-size) image and video encoders, random weights, real forward passes.

Audio (BEATs + Q-Former) and point (Point-BERT) published shapes are checked in their own files.
"""

from __future__ import annotations

import pytest
import torch

from mcomp.encoders.image import ImageAdapter, ImageAdapterConfig
from mcomp.encoders.video import VideoAdapter, VideoAdapterConfig

pytestmark = pytest.mark.slow


def test_image_default_is_clip_vit_l14_336_patch_tokens():
    torch.manual_seed(0)
    adapter = ImageAdapter(ImageAdapterConfig(), llm_hidden_size=4096)
    assert adapter.encoder.layers == 24 and adapter.encoder.image_size == 336
    with torch.no_grad():
        feats = adapter.encode(torch.randn(1, 3, 336, 336))
    assert feats.shape == (1, 576, 1024) and adapter.num_tokens == 576
    proj = adapter.projector.state_dict()
    assert proj["0.weight"].shape == (4096, 1024) and proj["2.weight"].shape == (4096, 4096)


def test_video_default_is_8_frames_of_257_tokens():
    torch.manual_seed(0)
    adapter = VideoAdapter(VideoAdapterConfig(), llm_hidden_size=4096)
    with torch.no_grad():
        feats = adapter.encode(torch.randn(1, 8, 3, 224, 224))
    assert feats.shape == (1, 8 * 257, 1024) and adapter.num_tokens == 2056
    assert adapter.projector.state_dict()["0.weight"].shape == (4096, 1024)
