"""Point-cloud adapter: file decoding, preprocessing, Point-BERT grouping and architecture, composition."""

from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest
import torch
import torch.nn.functional as F

from mcomp.encoders.point import PointAdapter, PointAdapterConfig, read_point_file
from mcomp.encoders.pointbert import (
    PointBert,
    PointBertConfig,
    farthest_point_sample,
    group_points,
    knn_indices,
)
from mcomp.errors import MediaBatchError, MediaError
from mcomp.modality import build_adapter
from mcomp.resources import load_config

N_POINTS = 300  # points in the files written below
TINY_POINTS = 256  # adapter resampling target in the tiny config


def tiny_config(**overrides) -> PointAdapterConfig:
    fields = {"encoder": load_config("encoders", "tiny-pointbert.json"), "num_points": TINY_POINTS}
    fields.update(overrides)
    return PointAdapterConfig(**fields)


def o3d_cloud(xyz, rgb=None):
    cloud = o3d.geometry.PointCloud()
    cloud.points = o3d.utility.Vector3dVector(xyz)
    if rgb is not None:
        cloud.colors = o3d.utility.Vector3dVector(rgb)
    return cloud


@pytest.fixture(scope="module")
def clouds(tmp_path_factory):
    """Real files on disk with known content, good and bad."""
    root = tmp_path_factory.mktemp("points")
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(N_POINTS, 3)) * [1.0, 2.0, 0.5] + [3.0, -1.0, 0.25]
    rgb = rng.uniform(size=(N_POINTS, 3))
    f = {"xyz": xyz, "rgb": rgb}

    f["ply_rgb"] = root / "chair_rgb.ply"
    o3d.io.write_point_cloud(str(f["ply_rgb"]), o3d_cloud(xyz, rgb))
    f["ply"] = root / "chair.ply"
    o3d.io.write_point_cloud(str(f["ply"]), o3d_cloud(xyz))
    f["pcd"] = root / "chair.pcd"
    o3d.io.write_point_cloud(str(f["pcd"]), o3d_cloud(xyz, rgb))
    f["pts"] = root / "chair.pts"
    o3d.io.write_point_cloud(str(f["pts"]), o3d_cloud(xyz, rgb))
    f["xyz_txt"] = root / "chair.xyz"
    np.savetxt(f["xyz_txt"], xyz, fmt="%.8f")
    f["xyzrgb_txt"] = root / "chair.xyzrgb"
    np.savetxt(f["xyzrgb_txt"], np.hstack([xyz, rgb]), fmt="%.8f")
    f["npy3"] = root / "chair3.npy"
    np.save(f["npy3"], xyz.astype(np.float32))
    f["npy6"] = root / "chair6.npy"
    np.save(f["npy6"], np.hstack([xyz, rgb]).astype(np.float32))
    f["rgb255"] = np.round(rgb * 255)
    f["npy255"] = root / "chair255.npy"
    np.save(f["npy255"], np.hstack([xyz, f["rgb255"]]).astype(np.float32))

    # bad files
    f["empty_ply"] = root / "empty.ply"
    f["empty_ply"].write_text(
        "ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    )
    f["garbage_ply"] = root / "garbage.ply"
    f["garbage_ply"].write_bytes(rng.bytes(400))
    data = f["ply_rgb"].read_bytes()
    f["truncated_ply"] = root / "truncated.ply"
    f["truncated_ply"].write_bytes(data[: len(data) // 2])  # open3d returns garbage points for this one
    f["empty_xyz"] = root / "blank.xyz"
    f["empty_xyz"].write_text("")
    f["nan_xyz"] = root / "holes.xyz"
    f["nan_xyz"].write_text("0 0 0\n1 nan 1\n2 2 2\n")
    bad = xyz.copy()
    bad[7, 2] = np.inf
    f["inf_npy"] = root / "inf.npy"
    np.save(f["inf_npy"], bad)
    f["npy4"] = root / "four_cols.npy"
    np.save(f["npy4"], np.zeros((10, 4), np.float32))
    f["npy1d"] = root / "flat.npy"
    np.save(f["npy1d"], np.zeros(30, np.float32))
    f["npy_empty"] = root / "none.npy"
    np.save(f["npy_empty"], np.zeros((0, 3), np.float32))
    f["npy_pickle"] = root / "pickled.npy"
    np.save(f["npy_pickle"], np.array([{"xyz": 1}], dtype=object), allow_pickle=True)
    f["npy_corrupt"] = root / "corrupt.npy"
    f["npy_corrupt"].write_bytes(b"\x93NUMPY garbage" + rng.bytes(64))
    f["npy_bad_rgb"] = root / "bad_rgb.npy"
    np.save(f["npy_bad_rgb"], np.hstack([xyz, rgb * 1000]))
    f["wrong_ext"] = root / "chair.txt"
    np.savetxt(f["wrong_ext"], xyz)
    return f


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    return PointAdapter(tiny_config(), llm_hidden_size=64)


# --- reading --------------------------------------------------------------------------------
def test_ply_with_and_without_colours_decode_to_written_values(clouds):
    with_rgb = read_point_file(str(clouds["ply_rgb"]))
    np.testing.assert_array_equal(with_rgb.xyz, clouds["xyz"])  # open3d writes PLY xyz as double
    # PLY colours are stored as 8-bit: open3d quantises on write and divides by 255 on read
    np.testing.assert_allclose(with_rgb.rgb, np.round(clouds["rgb"] * 255) / 255, atol=1e-12)
    plain = read_point_file(str(clouds["ply"]))
    np.testing.assert_array_equal(plain.xyz, clouds["xyz"])
    assert plain.rgb is None


def test_pcd_pts_xyz_and_xyzrgb_decode_to_written_values(clouds):
    pcd = read_point_file(str(clouds["pcd"]))
    np.testing.assert_allclose(pcd.xyz, clouds["xyz"], atol=1e-5)  # PCD stores float32
    assert pcd.rgb.shape == (N_POINTS, 3)
    np.testing.assert_allclose(pcd.rgb, clouds["rgb"], atol=1 / 255)  # packed 8-bit rgb
    pts = read_point_file(str(clouds["pts"]))
    np.testing.assert_allclose(pts.xyz, clouds["xyz"], atol=1e-9)
    np.testing.assert_allclose(pts.rgb, clouds["rgb"], atol=0.5 / 255)  # stored as 0-255 integers
    txt = read_point_file(str(clouds["xyz_txt"]))
    np.testing.assert_allclose(txt.xyz, clouds["xyz"], atol=1e-8)
    assert txt.rgb is None
    txt_rgb = read_point_file(str(clouds["xyzrgb_txt"]))
    np.testing.assert_allclose(txt_rgb.xyz, clouds["xyz"], atol=1e-8)
    np.testing.assert_allclose(txt_rgb.rgb, clouds["rgb"], atol=1e-8)


def test_npy_n3_n6_and_0_255_colours(clouds):
    n3 = read_point_file(str(clouds["npy3"]))
    np.testing.assert_array_equal(n3.xyz, clouds["xyz"].astype(np.float32))
    assert n3.rgb is None
    n6 = read_point_file(str(clouds["npy6"]))
    np.testing.assert_array_equal(n6.rgb, clouds["rgb"].astype(np.float32))
    scaled = read_point_file(str(clouds["npy255"]))  # max > 1: taken as 0-255 and divided by 255
    np.testing.assert_allclose(scaled.rgb, clouds["rgb255"] / 255, atol=1e-12)
    assert scaled.rgb.max() <= 1 and scaled.rgb.max() > 0.9


def test_colours_as_stored_as_the_released_code_reads_them(clouds):
    """The released code feeds the npy values to Point-BERT as they are (np.load, no scaling):
    color_range="as_stored" does the same; the default divides 0-255 colours by 255."""
    raw = np.load(clouds["npy255"]).astype(np.float32)
    stored = PointAdapter(tiny_config(num_points=N_POINTS, color_range="as_stored"), llm_hidden_size=16)
    torch.testing.assert_close(stored.input_tensor(str(clouds["npy255"])), torch.from_numpy(raw))
    scaled = PointAdapter(tiny_config(num_points=N_POINTS), llm_hidden_size=16).input_tensor(str(clouds["npy255"]))
    torch.testing.assert_close(scaled[:, 3:], torch.from_numpy(raw[:, 3:] / 255))
    with pytest.raises(ValueError, match="color_range must be one of"):
        tiny_config(color_range="raw")


@pytest.mark.parametrize(
    "key, message",
    [
        ("empty_ply", r"empty\.ply.*(no points|unreadable)"),
        ("garbage_ply", r"garbage\.ply.*(corrupt|no points)"),
        ("truncated_ply", r"truncated\.ply.*corrupt or unreadable.*open3d: Read PLY failed"),
        ("empty_xyz", r"blank\.xyz.*contains no points"),
        ("nan_xyz", r"holes\.xyz.*1 point\(s\) have NaN or infinite coordinates \(first: point 1\)"),
        ("inf_npy", r"inf\.npy.*1 point\(s\) have NaN or infinite coordinates \(first: point 7\)"),
        ("npy4", r"four_cols\.npy.*N x 3 \(xyz\) or N x 6 \(xyz \+ rgb\) array, got shape \(10, 4\)"),
        ("npy1d", r"flat\.npy.*got shape \(30,\)"),
        ("npy_empty", r"none\.npy.*no points"),
        ("npy_pickle", r"pickled\.npy.*not a plain numeric \.npy array"),
        ("npy_corrupt", r"corrupt\.npy.*(not a plain numeric|corrupt or truncated)"),
        ("npy_bad_rgb", r"bad_rgb\.npy.*colour values out of range"),
        ("wrong_ext", r"chair\.txt.*unsupported point-cloud file extension '\.txt'"),
    ],
)
def test_bad_files_raise_media_error_naming_the_file(adapter, clouds, key, message):
    with pytest.raises(MediaError, match=message) as err:
        adapter.input_tensor(str(clouds[key]))
    assert err.value.path == str(clouds[key]) and err.value.modality == "point"


def test_missing_file(adapter, tmp_path):
    with pytest.raises(MediaError, match=r"gone\.ply.*file not found"):
        adapter.load(str(tmp_path / "gone.ply"))


def test_batch_error_names_exactly_the_failing_indices(adapter, clouds):
    sources = [clouds["ply_rgb"], clouds["npy4"], clouds["npy6"], clouds["nan_xyz"], clouds["pcd"]]
    with pytest.raises(MediaBatchError) as err:
        adapter.prepare([str(s) for s in sources])
    assert list(err.value.failures) == [1, 3]
    assert "four_cols.npy" in str(err.value.failures[1]) and "holes.xyz" in str(err.value.failures[3])
    assert "chair" not in str(err.value)


# --- preprocessing -----------------------------------------------------------------------------
def test_output_is_xyz_plus_rgb_with_grey_for_missing_colour(clouds):
    cfg = tiny_config(num_points=N_POINTS)  # no resampling: rows map one to one
    ad = PointAdapter(cfg, llm_hidden_size=64)
    coloured = ad.input_tensor(str(clouds["npy6"]))
    assert coloured.shape == (N_POINTS, 6) and coloured.dtype == torch.float32
    expected = np.hstack([clouds["xyz"], clouds["rgb"]]).astype(np.float32)
    np.testing.assert_array_equal(coloured.numpy(), expected)  # normalization "none": values as stored
    plain = ad.input_tensor(str(clouds["ply"]))
    np.testing.assert_allclose(plain[:, :3].numpy(), clouds["xyz"].astype(np.float32))
    assert torch.all(plain[:, 3:] == 0.4)


def test_resampling_is_seeded_and_keeps_real_points(clouds):
    xyz = clouds["xyz"]
    fewer = PointAdapter(tiny_config(num_points=512), 64).input_tensor(str(clouds["npy3"]))[:, :3].numpy()
    assert fewer.shape == (512, 3)
    np.testing.assert_array_equal(fewer[:N_POINTS], xyz.astype(np.float32))  # every point once, in order
    originals = {tuple(p) for p in xyz.astype(np.float32)}
    assert all(tuple(p) in originals for p in fewer[N_POINTS:])  # padding repeats real points

    more_a = PointAdapter(tiny_config(num_points=128, seed=1), 64).input_tensor(str(clouds["npy3"]))
    more_b = PointAdapter(tiny_config(num_points=128, seed=1), 64).input_tensor(str(clouds["npy3"]))
    more_c = PointAdapter(tiny_config(num_points=128, seed=2), 64).input_tensor(str(clouds["npy3"]))
    assert torch.equal(more_a, more_b) and not torch.equal(more_a, more_c)
    rows = {tuple(p) for p in more_a[:, :3].numpy()}
    assert len(rows) == 128 and rows <= originals  # a subset without repeats

    fps = PointAdapter(tiny_config(num_points=128, resample="fps"), 64).input_tensor(str(clouds["npy3"]))
    fps_rows = {tuple(p) for p in fps[:, :3].numpy()}
    assert len(fps_rows) == 128 and fps_rows <= originals
    # FPS spreads out: its closest pair is farther apart than a random subset's
    assert torch.pdist(fps[:, :3]).min() > torch.pdist(more_a[:, :3]).min()


def test_unit_sphere_normalisation(clouds):
    ad = PointAdapter(tiny_config(num_points=N_POINTS, normalization="unit_sphere"), 64)
    out = ad.input_tensor(str(clouds["npy6"])).double().numpy()
    xyz = clouds["xyz"].astype(np.float32).astype(np.float64)
    centred = xyz - xyz.mean(axis=0)
    expected = centred / np.linalg.norm(centred, axis=1).max()
    np.testing.assert_allclose(out[:, :3], expected, atol=1e-6)
    np.testing.assert_allclose(out[:, :3].mean(axis=0), 0, atol=1e-6)
    assert np.linalg.norm(out[:, :3], axis=1).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out[:, 3:], clouds["rgb"], atol=1e-7)  # colours untouched
    same_point = ad.preprocess(np.ones((5, 3)))  # degenerate: centred, not divided by zero
    assert torch.all(same_point[:, :3] == 0) and torch.isfinite(same_point).all()


def test_in_memory_inputs(adapter, clouds):
    from_file = adapter.input_tensor(str(clouds["npy6"]))
    arr = np.hstack([clouds["xyz"], clouds["rgb"]]).astype(np.float32)
    assert torch.equal(adapter.input_tensor(arr), from_file)
    assert torch.equal(
        adapter.input_tensor(o3d_cloud(arr[:, :3].astype(np.float64), arr[:, 3:].astype(np.float64))), from_file
    )
    assert adapter.input_tensor(from_file) is from_file  # [num_points, 6] tensors count as preprocessed
    with pytest.raises(MediaError, match=r"N x 3 or N x 6 point array, got shape \(4, 5\)"):
        adapter.input_tensor(np.zeros((4, 5)))
    with pytest.raises(MediaError, match="NaN or infinite"):
        adapter.input_tensor(np.array([[0, 0, 0], [np.nan, 0, 0]] * 2))


# --- grouping --------------------------------------------------------------------------------
def brute_force_fps(xyz: np.ndarray, k: int, start: int) -> list[int]:
    chosen = [start]
    while len(chosen) < k:
        d = [min(((xyz[i] - xyz[c]) ** 2).sum() for c in chosen) for i in range(len(xyz))]
        chosen.append(int(np.argmax(d)))
    return chosen


def test_fps_matches_brute_force():
    pts = torch.rand(3, 60, 3, generator=torch.Generator().manual_seed(0))
    starts = torch.tensor([0, 17, 59])
    got = farthest_point_sample(pts, 12, starts)
    for b in range(3):
        assert got[b].tolist() == brute_force_fps(pts[b].double().numpy(), 12, int(starts[b]))
    assert len(set(farthest_point_sample(pts, 60, starts)[0].tolist())) == 60  # all points, no repeats


def test_knn_and_grouping_match_brute_force():
    g = torch.Generator().manual_seed(1)
    pts = torch.cat([torch.rand(2, 80, 3, generator=g), torch.rand(2, 80, 3, generator=g)], dim=-1)
    idx = knn_indices(5, pts[..., :3], pts[:, :4, :3])
    for b in range(2):
        for s in range(4):
            d = ((pts[b, :, :3] - pts[b, s, :3]) ** 2).sum(-1)
            assert idx[b, s].tolist() == d.argsort()[:5].tolist()
    groups, centres = group_points(pts, 4, 5, torch.tensor([3, 3]))
    fps = farthest_point_sample(pts[..., :3], 4, torch.tensor([3, 3]))
    for b in range(2):
        torch.testing.assert_close(centres[b], pts[b, fps[b], :3])
        nbr = knn_indices(5, pts[b : b + 1, :, :3], centres[b : b + 1])[0]
        torch.testing.assert_close(groups[b, ..., :3], pts[b, nbr, :3] - centres[b, :, None])  # relative xyz
        torch.testing.assert_close(groups[b, ..., 3:], pts[b, nbr, 3:])  # raw rgb
    assert torch.all(groups[:, :, 0, :3] == 0)  # each centre is its own nearest neighbour


# --- encoder ---------------------------------------------------------------------------------
def spec_state_dict_shapes() -> dict[str, tuple]:
    """The released Point-BERT v1.2 state dict, from the interoperability spec (section 6.4)."""
    shapes = {
        "cls_token": (1, 1, 384),
        "cls_pos": (1, 1, 384),
        "reduce_dim.weight": (384, 256),
        "reduce_dim.bias": (384,),
        "pos_embed.0.weight": (128, 3),
        "pos_embed.0.bias": (128,),
        "pos_embed.2.weight": (384, 128),
        "pos_embed.2.bias": (384,),
        "norm.weight": (384,),
        "norm.bias": (384,),
    }
    for name, cin, mid, cout in (("first_conv", 6, 128, 256), ("second_conv", 512, 512, 256)):
        p = f"encoder.{name}"
        shapes.update(
            {
                f"{p}.0.weight": (mid, cin, 1),
                f"{p}.0.bias": (mid,),
                f"{p}.3.weight": (cout, mid, 1),
                f"{p}.3.bias": (cout,),
            }
        )
        shapes.update({f"{p}.1.{k}": (mid,) for k in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{p}.1.num_batches_tracked"] = ()
    for i in range(12):
        p = f"blocks.blocks.{i}"
        shapes.update(
            {
                f"{p}.norm1.weight": (384,),
                f"{p}.norm1.bias": (384,),
                f"{p}.norm2.weight": (384,),
                f"{p}.norm2.bias": (384,),
                f"{p}.attn.qkv.weight": (1152, 384),
                f"{p}.attn.proj.weight": (384, 384),
                f"{p}.attn.proj.bias": (384,),
                f"{p}.mlp.fc1.weight": (1536, 384),
                f"{p}.mlp.fc1.bias": (1536,),
                f"{p}.mlp.fc2.weight": (384, 1536),
                f"{p}.mlp.fc2.bias": (384,),
            }
        )
    return shapes


@pytest.mark.slow
def test_published_size_encoder_keys_params_and_output_shape():
    torch.manual_seed(0)
    adapter = PointAdapter(PointAdapterConfig(), llm_hidden_size=4096)
    state = adapter.encoder.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == spec_state_dict_shapes()
    assert sum(p.numel() for p in adapter.encoder.parameters()) == 21_859_200
    assert adapter.encoder_dim == 384 and adapter.num_tokens == 513
    proj = adapter.projector.state_dict()  # model.modal_projectors.point.{0,2}.*
    assert {k: tuple(v.shape) for k, v in proj.items()} == {
        "0.weight": (4096, 384),
        "0.bias": (4096,),
        "2.weight": (4096, 4096),
        "2.bias": (4096,),
    }
    points = torch.rand(2, 8192, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = adapter.encode(points)
    assert feats.shape == (2, 513, 384) and torch.isfinite(feats).all()


def reference_forward(sd: dict, cfg: PointBertConfig, groups: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Point-BERT written out with functional ops from the spec, given the groups and centres."""

    def pointnet(x, name):  # Conv1d, BN (running stats), ReLU, Conv1d
        p = f"encoder.{name}"
        x = F.conv1d(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"])
        x = F.batch_norm(x, sd[f"{p}.1.running_mean"], sd[f"{p}.1.running_var"], sd[f"{p}.1.weight"], sd[f"{p}.1.bias"])
        return F.conv1d(F.relu(x), sd[f"{p}.3.weight"], sd[f"{p}.3.bias"])

    b, g, m, c = groups.shape
    x = pointnet(groups.reshape(b * g, m, c).transpose(1, 2), "first_conv")
    x = torch.cat([x.max(2, keepdim=True).values.expand(-1, -1, m), x], 1)
    tokens = pointnet(x, "second_conv").max(2).values.reshape(b, g, -1)
    x = torch.cat(
        [sd["cls_token"].expand(b, -1, -1), F.linear(tokens, sd["reduce_dim.weight"], sd["reduce_dim.bias"])], 1
    )
    pos = F.linear(
        F.gelu(F.linear(centres, sd["pos_embed.0.weight"], sd["pos_embed.0.bias"])),
        sd["pos_embed.2.weight"],
        sd["pos_embed.2.bias"],
    )
    pos = torch.cat([sd["cls_pos"].expand(b, -1, -1), pos], 1)
    d, h = cfg.trans_dim, cfg.num_heads
    for i in range(cfg.depth):
        p = f"blocks.blocks.{i}"
        x = x + pos
        y = F.layer_norm(x, (d,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"])
        q, k, v = F.linear(y, sd[f"{p}.attn.qkv.weight"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, -1, h, d // h).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, -1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(b, -1, d), sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
        y = F.layer_norm(x, (d,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"])
        y = F.linear(
            F.gelu(F.linear(y, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])),
            sd[f"{p}.mlp.fc2.weight"],
            sd[f"{p}.mlp.fc2.bias"],
        )
        x = x + y
    return F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"])


def test_encoder_matches_functional_reference():
    cfg = PointBertConfig(**load_config("encoders", "tiny-pointbert.json"))
    torch.manual_seed(0)
    enc = PointBert(cfg, fps_start="zero").eval()
    for bn in (enc.encoder.first_conv[1], enc.encoder.second_conv[1]):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    pts = torch.rand(2, TINY_POINTS, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = enc(pts)
        groups, centres = group_points(pts, cfg.num_group, cfg.group_size, torch.zeros(2, dtype=torch.long))
        want = reference_forward(enc.state_dict(), cfg, groups, centres)
    assert got.shape == (2, cfg.num_group + 1, cfg.trans_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_fps_start_modes_and_determinism():
    cfg = PointBertConfig(**load_config("encoders", "tiny-pointbert.json"))
    torch.manual_seed(0)
    enc = PointBert(cfg, fps_start="seeded", seed=5).eval()
    a, b = torch.rand(2, 1, TINY_POINTS, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ab = enc(torch.cat([a, b]))
        ba = enc(torch.cat([b, a]))
        again = enc(torch.cat([a, b]))
    assert torch.equal(ab, again)
    torch.testing.assert_close(ab[0], ba[1])  # a cloud's tokens do not depend on its batch
    start = enc.fps_start_indices(3, TINY_POINTS, torch.device("cpu"))
    assert start.tolist() == [start[0].item()] * 3
    assert start[0].item() == torch.randint(0, TINY_POINTS, (1,), generator=torch.Generator().manual_seed(5)).item()
    enc.fps_start = "zero"
    assert enc.fps_start_indices(2, TINY_POINTS, torch.device("cpu")).tolist() == [0, 0]
    enc.fps_start = "random"  # upstream: the global RNG
    torch.manual_seed(1)
    r1 = enc.fps_start_indices(4, TINY_POINTS, torch.device("cpu"))
    torch.manual_seed(1)
    assert torch.equal(r1, enc.fps_start_indices(4, TINY_POINTS, torch.device("cpu")))
    with pytest.raises(ValueError, match="fps_start must be one of"):
        PointAdapterConfig(fps_start="first")


def test_checkpoint_loads_strictly_and_names_the_file(tmp_path):
    torch.manual_seed(0)
    source = PointBert(PointBertConfig(**load_config("encoders", "tiny-pointbert.json")))
    plain = tmp_path / "point_bert_tiny.pt"
    torch.save(source.state_dict(), plain)
    wrapped = tmp_path / "pointbert_train.pth"  # Point-BERT training format
    torch.save({"state_dict": {f"module.point_encoder.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    for path in (plain, wrapped):
        torch.manual_seed(1)
        ad = PointAdapter(tiny_config(checkpoint=str(path)), 64)
        for k, v in source.state_dict().items():
            assert torch.equal(ad.encoder.state_dict()[k], v), k
    with pytest.raises(
        ValueError,
        match=r"point_bert_tiny\.pt.*do not match.*wrong shapes "
        r"\['blocks\.blocks\.0\.attn\.proj\.bias: file \(32,\) vs model \(64,\)",
    ):
        PointAdapter(
            tiny_config(
                checkpoint=str(plain), encoder={**load_config("encoders", "tiny-pointbert.json"), "trans_dim": 64}
            ),
            64,
        )


# --- adapter and composed model ----------------------------------------------------------------
def test_adapter_features_are_deterministic(clouds):
    paths = [str(clouds["ply_rgb"]), str(clouds["npy3"])]
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        ad = PointAdapter(tiny_config(), llm_hidden_size=64)
        batch = ad.prepare(paths)
        assert batch.shape == (2, TINY_POINTS, 6)
        outs.append(ad(batch))
    assert outs[0].shape == (2, 33, 64)
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0][0], outs[0][1])
    assert list(ad.projector.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_config_round_trip_and_validation(tmp_path):
    cfg = tiny_config(normalization="unit_sphere", seed=3)
    path = tmp_path / "point.json"
    cfg.to_json_file(path)
    back = PointAdapterConfig.from_json_file(path)
    assert back == cfg and isinstance(back.encoder, PointBertConfig)
    ad = build_adapter(cfg.to_dict(), 64)
    assert isinstance(ad, PointAdapter) and ad.num_tokens == 33
    with pytest.raises(ValueError, match="normalization must be one of"):
        tiny_config(normalization="sphere")
    with pytest.raises(ValueError, match=r"num_points must be an integer >= 32"):
        tiny_config(num_points=16)
    with pytest.raises(ValueError, match=r"field 'encoder'.*unknown field\(s\) \['width'\]"):
        PointAdapterConfig(encoder={"width": 3})


@pytest.fixture(scope="module")
def composed():
    from mcomp.tiny import build_tiny_mllm, tiny_image_adapter_config

    return build_tiny_mllm([tiny_image_adapter_config(), tiny_config()], seed=0)


def test_composed_model_generates_and_scores_with_points(composed, clouds):
    model = composed
    assert model.modalities == ["image", "point"]
    prompt = model.template.prompt("<point>\nWhat is this object?")
    media = {"point": str(clouds["ply_rgb"])}
    inputs = model.prepare_inputs([prompt], [media])
    point_positions = (inputs.modality_ids[0] == 1).nonzero().flatten()
    assert len(point_positions) == 33  # 513 at the published size
    assert point_positions.diff().eq(1).all()  # one contiguous run where <point> was
    expected = model.adapters["point"](model.adapters["point"].prepare([media["point"]]))[0]
    torch.testing.assert_close(inputs.inputs_embeds[0, point_positions], expected)

    out1 = model.generate([prompt], [media], max_new_tokens=6)
    out2 = model.generate([prompt], [media], max_new_tokens=6)
    assert isinstance(out1[0], str) and out1 == out2
    options = [" a chair", " a red table"]
    res = model.loglikelihood(prompt, options, media)
    assert [r.num_tokens for r in res] == [
        len(model.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options
    ]
    assert all(np.isfinite(r.logprob) and r.logprob < 0 for r in res)
    assert [r.logprob for r in res] == [r.logprob for r in model.loglikelihood(prompt, options, media)]
    other = model.loglikelihood(prompt, options, {"point": str(clouds["npy3"])})
    assert other[0].logprob != res[0].logprob  # the cloud reaches the LLM


def test_composed_model_reports_bad_point_file(composed, clouds):
    prompt = composed.template.prompt("<point> ?")
    with pytest.raises(MediaBatchError) as err:
        composed.generate(
            [prompt, prompt], [{"point": str(clouds["npy6"])}, {"point": str(clouds["npy4"])}], max_new_tokens=2
        )
    assert list(err.value.failures) == [1] and "four_cols.npy" in str(err.value)


def test_composed_model_round_trips_through_save_pretrained(composed, clouds, tmp_path):
    from mcomp.model import MultimodalLM

    prompt = composed.template.prompt("<point> what?")
    media = {"point": str(clouds["pcd"])}
    before = composed.loglikelihood(prompt, [" a chair"], media)[0].logprob
    composed.save_pretrained(tmp_path / "mllm")
    loaded = MultimodalLM.from_pretrained(tmp_path / "mllm")
    assert loaded.adapters["point"].config == composed.adapters["point"].config  # nested encoder config survives JSON
    assert loaded.loglikelihood(prompt, [" a chair"], media)[0].logprob == before


def test_pointnet_width_sets_the_mini_pointnet_convs():
    """`pointnet_width` narrows the mini-PointNet (first conv width/2 -> width, second 2*width), and the
    default keeps the published 128/256/512 convs that real checkpoints carry."""
    narrow = PointBert(
        PointBertConfig(
            trans_dim=32, depth=1, num_heads=2, num_group=8, group_size=8, encoder_dims=32, pointnet_width=64
        )
    )
    shapes = {k: tuple(v.shape) for k, v in narrow.state_dict().items() if k.startswith("encoder.")}
    assert shapes["encoder.first_conv.0.weight"] == (32, 6, 1)
    assert shapes["encoder.first_conv.3.weight"] == (64, 32, 1)
    assert shapes["encoder.second_conv.0.weight"] == (128, 128, 1)
    assert shapes["encoder.second_conv.3.weight"] == (32, 128, 1)
    published = PointBert(PointBertConfig(trans_dim=32, depth=1, num_heads=2, num_group=8, group_size=8))
    assert tuple(published.state_dict()["encoder.second_conv.0.weight"].shape) == (512, 512, 1)
    with torch.no_grad():
        assert narrow(torch.rand(2, 64, 6)).shape == (2, 9, 32)
    with pytest.raises(ValueError, match="pointnet_width must be even"):
        PointBertConfig(pointnet_width=63)
