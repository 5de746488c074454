"""Public encoder weights into mcomp's encoders (CLIP in OpenAI and transformers layouts, LanguageBind video,
BEATs, Point-BERT): numerics where a reference exists, and strict loading that names bad keys; the
placeholder tokenisation of spec §4."""

from __future__ import annotations

import re

import pytest
import torch

from mcomp.encoders.beats import load_beats
from mcomp.encoders.clip_tower import ClipVisionTower
from mcomp.encoders.languagebind import LanguageBindVideoTower
from mcomp.encoders.pointbert import PointBert, PointBertConfig
from mcomp.interop.clip_weights import read_clip_vision, write_open_clip_tower
from tests.interop_fixtures import (
    BEATS_CFG,
    LB_VISION,
    beats_state,
    languagebind_state,
    point_state,
    write_clip_hf,
    write_languagebind,
)


def _pixels(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- CLIP --------------------------------------------------------------------------------------
@pytest.mark.parametrize("full", [False, True], ids=["CLIPVisionModel", "CLIPModel"])
def test_clip_transformers_layout_matches_transformers(tmp_path, full):
    from transformers import CLIPModel, CLIPVisionModel

    src = write_clip_hf(tmp_path / "clip", full=full)
    out = tmp_path / "tower.safetensors"
    cfg = write_open_clip_tower(src, out)
    assert cfg["quick_gelu"] and cfg["vision_cfg"]["head_width"] == 16
    tower = ClipVisionTower("custom", cfg, str(out)).eval()
    hf = (CLIPModel if full else CLIPVisionModel).from_pretrained(src).eval()
    pixels = _pixels()
    with torch.no_grad():
        vision = hf.vision_model if full else hf
        want = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        for layer in (-2, -1, 1):
            torch.testing.assert_close(tower(pixels, layer), want[layer], atol=1e-5, rtol=1e-5)
    if full:
        torch.testing.assert_close(tower.visual.proj, hf.visual_projection.weight.t())


def test_clip_transformers_layout_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    src = write_clip_hf(tmp_path / "clip", full=True)
    state = load_file(str(src / "model.safetensors"))
    del state["vision_model.encoder.layers.2.mlp.fc2.bias"]
    state["vision_model.encoder.layers.0.self_attn.rel_bias"] = torch.zeros(3)
    state["vision_model.pre_layrnorm.weight"] = torch.zeros(7)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        read_clip_vision(src)
    msg = str(err.value)
    assert "missing 1 key(s): vision_model.encoder.layers.2.mlp.fc2.bias" in msg
    assert "unexpected 1 key(s): vision_model.encoder.layers.0.self_attn.rel_bias" in msg
    assert "vision_model.pre_layrnorm.weight: file (7,)" in msg


def _openai_state(width=64):
    cfg = {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": width, "head_width": 64, "patch_size": 8},
    }
    torch.manual_seed(5)
    tower = ClipVisionTower("custom", cfg)
    state = {f"visual.{k}": v.clone() for k, v in tower.visual.state_dict().items()}
    state.update(
        {
            "positional_embedding": torch.randn(16, 32),
            "token_embedding.weight": torch.randn(99, 32),
            "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32),
            "ln_final.weight": torch.ones(32),
            "text_projection": torch.randn(32, 32),
            "logit_scale": torch.tensor(4.6),
            "input_resolution": 32,
            "context_length": 16,
            "vocab_size": 99,
        }
    )
    return tower, state


def test_clip_openai_layout(tmp_path):
    tower, state = _openai_state()
    torch.save(state, tmp_path / "ViT-tiny.pt")
    cfg = write_open_clip_tower(tmp_path / "ViT-tiny.pt", tmp_path / "t.safetensors")
    assert cfg == {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 8},
    }
    loaded = ClipVisionTower("custom", cfg, str(tmp_path / "t.safetensors")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_pixels()), tower.eval()(_pixels()))
    del state["visual.transformer.resblocks.1.ln_2.bias"]
    state["visual.attnpool.k_proj.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(
        ValueError,
        match=r"missing 1 key\(s\): visual\.transformer\.resblocks\.1\.ln_2\.bias; "
        r"unexpected 1 key\(s\): visual\.attnpool\.k_proj\.weight",
    ):
        read_clip_vision(tmp_path / "bad.pt")


def test_clip_file_needing_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"visual.conv1.weight": Payload()}, tmp_path / "ViT-L-14-336px.pt")
    with pytest.raises(ValueError, match="refused to load.*TorchScript archive"):
        read_clip_vision(tmp_path / "ViT-L-14-336px.pt")
    assert not marker.exists()


# --- LanguageBind video ----------------------------------------------------------------------------
def test_languagebind_spatial_part_is_transformers_clip(tmp_path):
    """Without temporal attention the tower is a CLIP ViT with transformers' names and numerics."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    fields = {k: v for k, v in LB_VISION.items() if k not in ("add_time_attn", "num_frames")}
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(**fields)).eval()
    tower = LanguageBindVideoTower({**LB_VISION, "add_time_attn": False})
    tower.vision_model.load_state_dict(hf.state_dict(), strict=True)
    pixels = _pixels(3)
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        for layer in (-2, 0, 2):
            torch.testing.assert_close(tower(pixels, 1, layer), want[layer], atol=1e-5, rtol=1e-5)


def test_languagebind_temporal_attention(tmp_path):
    state = {k[len("vision_model.") :]: v for k, v in languagebind_state().items() if k.startswith("vision_model.")}
    tower = LanguageBindVideoTower(LB_VISION).eval()
    tower.vision_model.load_state_dict(state)
    frames = _pixels(8, seed=1)
    with torch.no_grad():
        base = tower(frames, 8)
        changed = frames.clone()
        changed[5] += 1.0
        other = tower(changed, 8)
        assert not torch.allclose(other[0], base[0])  # frame 0 sees frame 5 through the temporal attention
        for layer in tower.vision_model.encoder.layers:  # no temporal path -> frames independent
            layer.temporal_attn.out_proj.weight.zero_()
            layer.temporal_attn.out_proj.bias.zero_()
            layer.temporal_embedding.zero_()
        plain = LanguageBindVideoTower({**LB_VISION, "add_time_attn": False}).eval()
        plain.vision_model.load_state_dict(
            {k: v for k, v in tower.vision_model.state_dict().items() if "temporal" not in k}
        )
        torch.testing.assert_close(tower(frames, 8), plain(frames, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"expects 8 frames per clip \(or 1, a still image\), got 4"):
        tower(frames[:4], 4)


def test_languagebind_still_image_has_no_temporal_embedding():
    """The released layer with one frame coming in (a still image: `bt < t` makes t = 1): the temporal
    embedding is not added, and the temporal attention over a single frame is out_proj(v_proj(.)) of
    the normalised input (softmax over one key is 1); eight copies of the frame give other tokens."""
    state = {k[len("vision_model.") :]: v for k, v in languagebind_state().items() if k.startswith("vision_model.")}
    tower = LanguageBindVideoTower(LB_VISION).eval()
    tower.vision_model.load_state_dict(state)
    still = _pixels(1, seed=3)
    vm = tower.vision_model
    with torch.no_grad():
        got = tower(still, 1, select_layer=-1)
        x = vm.pre_layrnorm(vm.embeddings(still))
        for layer in vm.encoder.layers:
            attn = layer.temporal_attn
            x = x + attn.out_proj(attn.v_proj(layer.temporal_layer_norm1(x)))
            x = x + layer.self_attn(layer.layer_norm1(x))
            x = x + layer.mlp(layer.layer_norm2(x))
        torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)
        copies = tower(still.expand(8, -1, -1, -1), 8, select_layer=-1)
        assert not torch.allclose(copies[:1], got, atol=1e-3)


def test_languagebind_adapter_and_strict_loading(tmp_path):
    from safetensors.torch import load_file, save_file

    from mcomp.modality import build_adapter

    src = write_languagebind(tmp_path / "LanguageBind_Video_merge")
    adapter = build_adapter({"adapter": "video_languagebind", "checkpoint": str(src)}, 48)
    assert adapter.num_tokens == 8 * 17 and adapter.encoder_dim == 64
    clip = _pixels(8, seed=3)
    with torch.no_grad():
        feats = adapter.encode(clip[None])
        assert feats.shape == (1, 136, 64)
        torch.testing.assert_close(feats[0, :17], adapter.encoder(clip, 8, -2)[0])  # frame 0, CLS kept
    state = load_file(str(src / "model.safetensors"))
    del state["vision_model.encoder.layers.1.temporal_attn.v_proj.bias"]
    state["vision_model.encoder.layers.1.temporal_mlp.fc1.weight"] = torch.zeros(2, 2)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        LanguageBindVideoTower(LB_VISION, str(src))
    assert "missing 1 key(s): vision_model.encoder.layers.1.temporal_attn.v_proj.bias" in str(err.value)
    assert "unexpected 1 key(s): vision_model.encoder.layers.1.temporal_mlp.fc1.weight" in str(err.value)
    with pytest.raises(ValueError, match=r"does not match the adapter's tower_config.*num_hidden_layers"):
        LanguageBindVideoTower({**LB_VISION, "num_hidden_layers": 2}, str(src))


# --- BEATs, Point-BERT ------------------------------------------------------------------------
def test_beats_checkpoint_strict(tmp_path):
    state = beats_state()
    torch.save({"cfg": dict(BEATS_CFG), "model": state}, tmp_path / "BEATs_iter3_plus_AS2M.pt")
    model = load_beats(str(tmp_path / "BEATs_iter3_plus_AS2M.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    bad = dict(state)
    del bad["encoder.layers.1.self_attn.grep_a"]
    bad["encoder.layers.1.self_attn.extra"] = torch.zeros(1)
    torch.save({"cfg": dict(BEATS_CFG), "model": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_beats(str(tmp_path / "bad.pt"))
    assert "encoder.layers.1.self_attn.grep_a" in str(err.value) and "encoder.layers.1.self_attn.extra" in str(
        err.value
    )


def test_point_bert_checkpoint_strict(tmp_path):
    from mcomp.interop.modelcompose import point_bert_config

    state = point_state()
    torch.save(state, tmp_path / "point_bert_v1.2.pt")
    cfg = point_bert_config(tmp_path / "point_bert_v1.2.pt")
    assert (cfg["trans_dim"], cfg["depth"], cfg["num_heads"], cfg["encoder_dims"], cfg["point_dims"]) == (
        64,
        2,
        1,
        32,
        6,
    )
    assert (cfg["num_group"], cfg["group_size"]) == (512, 32)
    enc = PointBert(PointBertConfig(**cfg))
    enc.load_checkpoint(str(tmp_path / "point_bert_v1.2.pt"))
    del state["blocks.blocks.1.attn.qkv.weight"]
    state["blocks.blocks.1.attn.qkv.bias"] = torch.zeros(192)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(
        ValueError,
        match=r"missing \['blocks\.blocks\.1\.attn\.qkv\.weight'\], "
        r"unexpected \['blocks\.blocks\.1\.attn\.qkv\.bias'\]",
    ):
        enc.load_checkpoint(str(tmp_path / "bad.pt"))


# --- tokenisation (spec §4) ---------------------------------------------------------------------
def test_placeholder_tokenisation_matches_released(tokenizer):
    from mcomp.tiny import build_tiny_mllm, tiny_audio_adapter_config, tiny_image_adapter_config

    model = build_tiny_mllm([tiny_image_adapter_config(), tiny_audio_adapter_config()])
    prompt = model.template.prompt("image: <image>\naudio: <audio>\n<image><audio>What is it?")
    # released `tokenizer_modal_token`: split at tags, each chunk tokenised alone (BOS dropped), BOS once
    want = [tokenizer.bos_token_id]
    for part in re.split(r"(<image>|<audio>)", prompt):
        if part in ("<image>", "<audio>"):
            want.append(model.placeholder_ids[part])
        elif part:
            want += tokenizer(part)["input_ids"][1:]
    assert model.tokenize(prompt) == want
    # text after a placeholder restarts with the dummy prefix ("\n..." begins with "▁")
    after = tokenizer("\naudio: ")["input_ids"][1:]
    assert tokenizer.convert_ids_to_tokens(after)[0].startswith("▁")
    assert want.count(model.placeholder_ids["<image>"]) == 2
    assert tokenizer.convert_tokens_to_ids("<image>") == tokenizer.unk_token_id  # never in the vocabulary
