"""Shared fixtures: tiny models built locally and real media files written to disk."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: one intra-op thread is as fast and does not fight other
    processes for the 2 cores (use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    from mcomp.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture()
def tiny_model():
    from mcomp.tiny import build_tiny_mllm

    return build_tiny_mllm(seed=0)


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """A PNG and a JPEG with known content, plus a truncated PNG."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 30), torch.linspace(0, 1, 48), indexing="ij")
    smooth = torch.stack([xx, yy, 0.5 * (xx + yy)], dim=-1) * 200 + torch.rand(30, 48, 3, generator=g) * 8
    pixels = smooth.round().clamp(0, 255).to(torch.uint8).numpy()  # smooth, so JPEG stays close
    png, jpg, trunc = root / "noise.png", root / "noise.jpg", root / "truncated.png"
    Image.fromarray(pixels).save(png)
    Image.fromarray(pixels).save(jpg, quality=95)
    data = png.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    return {"png": png, "jpg": jpg, "truncated": trunc, "pixels": pixels}
