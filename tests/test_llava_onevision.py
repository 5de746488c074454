"""`mcomp import llava-hf` of a LLaVA-OneVision folder against transformers itself: a tiny
LlavaOnevisionForConditionalGeneration (SigLIP tower, Qwen2 language model, the real classes, config and key
names, random init) saved with its processor, imported as an mcomp image + video model whose LLM is a full
fine-tune of a Qwen2 base; anyres pixel values and packing, video pooling, logits and greedy generations
compared with the transformers model's, through the folder's own chat template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mcomp
from mcomp.checkpoint import read_config
from mcomp.interop.llava_hf import import_llava_hf
from tests.test_chat_templates import TEMPLATES, chat_template
from tests.test_llava_hf import TEXT as LLAVA_TEXT
from tests.test_llava_hf import fine_tune_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = {**LLAVA_TEXT, "max_position_embeddings": 4096, "tie_word_embeddings": False}
SIGLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [64, 96], [96, 64]]
PADDING_ROWS = 8  # the base's embedding has rows past its tokenizer, as Qwen2's does; OneVision's tokens use two
FRAMES = 4
# (width, height): wide and tall (padding cut off), square at 2 x 2 tiles and a long one (shrunk to
# anyres_max_2), an odd size
IMAGES = {
    "wide.png": (40, 30),
    "tall.png": (17, 50),
    "square.png": (64, 64),
    "long.png": (100, 28),
    "odd.jpg": (33, 21),
}


def qwen_tokenizer():
    from mcomp.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": TEMPLATES["qwen2.5"][1]})
    tokenizer.chat_template = chat_template("qwen2.5")
    return tokenizer


def tiny_onevision(root):
    """(folder, base folder): the OneVision folder as transformers saves it, fine-tuned from a Qwen2 base."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
    )

    base_tokenizer = qwen_tokenizer()
    vocab = len(base_tokenizer) + PADDING_ROWS
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **TEXT)).eval()
    base.save_pretrained(root / "base")
    base_tokenizer.save_pretrained(root / "base")

    tokenizer = qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [*TEMPLATES["qwen2.5"][1], "<image>", "<video>"]})
    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(vocab_size=vocab, **TEXT),
        vision_config=SiglipVisionConfig(**SIGLIP),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio="anyres_max_2",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    fine_tune_of(model, base, vocab, seed=1)
    model.save_pretrained(root / "onevision")
    size = {"height": 32, "width": 32}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_2",
    )
    processor.save_pretrained(root / "onevision")
    return root / "onevision", root / "base"


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    from mcomp.world.render_video import write_mp4

    root = tmp_path_factory.mktemp("onevision")
    folder, base = tiny_onevision(root)
    out = import_llava_hf(folder, root / "mcomp", base=base, num_frames=FRAMES)
    rng = np.random.default_rng(0)
    images = {}
    for name, (width, height) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(root / name)
        images[name] = str(root / name)
    write_mp4(str(root / "clip.mp4"), [rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8) for _ in range(12)])
    return {"folder": folder, "base": base, "out": out, "images": images, "video": str(root / "clip.mp4")}


def _reference(folder):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def _prompt(model, tag: str) -> str:
    """The folder's chat template around one question (Qwen2's tokenizer adds no BOS: nor does this one)."""
    return model.template.prompt(f"{tag}\nWhat is in it?")


def _relative_error(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_the_import_takes_both_modalities_and_the_folders_chat_template(onevision):
    cfg = read_config(onevision["out"])
    assert cfg.template == "chat"
    assert [a["adapter"] for a in cfg.adapters] == ["llava_onevision_image", "llava_onevision_video"]
    record = cfg.provenance["import"]
    assert record["architecture"] == "LlavaOnevisionForConditionalGeneration"
    assert 0 < record["relative_delta"] < 0.1 and record["vocabulary_rows_dropped"] == []
    assert cfg.adapters[0]["image_grid_pinpoints"] == PINPOINTS
    assert cfg.adapters[0]["vision_aspect_ratio"] == "anyres_max_2" and cfg.adapters[1]["num_frames"] == FRAMES
    model = mcomp.load(onevision["out"])
    prompt = _prompt(model, "<image>")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_pixel_values_are_the_folders_processor_output(onevision):
    from transformers import AutoVideoProcessor

    from mcomp.encoders.video import read_video_frames

    _, processor = _reference(onevision["folder"])
    model = mcomp.load(onevision["out"])
    for name, path in onevision["images"].items():
        with Image.open(path) as img:
            want = processor.image_processor(images=img, return_tensors="pt")
        got = model.adapters["image"].input_tensor(path)
        assert torch.equal(got[:-1], want["pixel_values"][0]), name  # the whole image, then its tiles
        assert got[-1].reshape(-1)[:2].tolist() == want["image_sizes"][0].tolist(), name
    frames = read_video_frames(onevision["video"], FRAMES)
    want = AutoVideoProcessor.from_pretrained(onevision["folder"])(videos=[frames], return_tensors="pt")
    got = model.adapters["video"].input_tensor(onevision["video"])
    assert got.shape == (FRAMES, 3, 32, 32) and torch.equal(got, want["pixel_values_videos"][0])


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_anyres_logits_equal_the_transformers_models(onevision, image):
    reference, processor = _reference(onevision["folder"])
    model = mcomp.load(onevision["out"])
    prompt = _prompt(model, "<image>")
    with Image.open(onevision["images"][image]) as img:
        inputs = processor(text=prompt, images=img.convert("RGB"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        want = reference(**inputs).logits[0]
        got = model(model.prepare_inputs([prompt], [{"image": onevision["images"][image]}])).logits[0]
    assert got.shape == want.shape  # as many image tokens as transformers packs for this size
    assert _relative_error(got, want) <= 1e-5


def test_the_long_image_is_shrunk_and_the_others_are_not(onevision):
    """The test images cover both sides of the anyres_max rule."""
    model = mcomp.load(onevision["out"])
    adapter = model.adapters["image"]
    shrunk = {name: adapter.layout((h, w)).shrunk is not None for name, (w, h) in IMAGES.items()}
    assert shrunk["long.png"] and shrunk["square.png"] and not shrunk["wide.png"] and not shrunk["tall.png"]


def test_video_logits_equal_the_transformers_models(onevision):
    from mcomp.encoders.video import read_video_frames

    reference, processor = _reference(onevision["folder"])
    model = mcomp.load(onevision["out"])
    prompt = _prompt(model, "<video>")
    frames = read_video_frames(onevision["video"], FRAMES)
    inputs = processor(text=prompt, videos=[frames], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        want = reference(**inputs).logits[0]
        got = model(model.prepare_inputs([prompt], [{"video": onevision["video"]}])).logits[0]
    assert got.shape == want.shape  # FRAMES x 2 x 2 pooled tokens and one newline
    assert _relative_error(got, want) <= 1e-5


def test_greedy_generations_are_identical(onevision):
    reference, processor = _reference(onevision["folder"])
    model = mcomp.load(onevision["out"])
    prompt = _prompt(model, "<image>")
    path = onevision["images"]["wide.png"]
    with Image.open(path) as img:
        inputs = processor(text=prompt, images=img.convert("RGB"), return_tensors="pt", add_special_tokens=False)
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = reference.generate(**inputs, **settings)[0, -10:]
        prepared = model.prepare_inputs([prompt], [{"image": path}])
        got = model.llm.generate(
            inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask, **settings
        )
    assert got[0].tolist() == want.tolist()


def test_image_and_video_in_one_prompt_and_a_batch_of_sizes(onevision):
    """Images of different sizes batch together (each its own token count) beside a video."""
    model = mcomp.load(onevision["out"])
    images = onevision["images"]
    prompts = [_prompt(model, "<image>\n<video>"), _prompt(model, "<image>")]
    media = [{"image": images["long.png"], "video": onevision["video"]}, {"image": images["tall.png"]}]
    batch = model.prepare_inputs(prompts, media)
    alone = [model.prepare_inputs([p], [m]) for p, m in zip(prompts, media)]
    with torch.no_grad():
        together = model(batch).logits
        for row, one in enumerate(alone):
            n = one.attention_mask.shape[1]
            single = model(one).logits[0]
            assert _relative_error(together[row, -n:], single) <= 1e-4


def test_the_cli_imports_with_the_template_asked_for(onevision, tmp_path, capsys):
    from mcomp.cli import main

    args = ["import", "llava-hf", str(onevision["folder"]), "--base", str(onevision["base"])]
    assert main([*args, "--out", str(tmp_path / "v"), "--template", "vicuna_v1", "--num-frames", "2"]) == 0
    cfg = read_config(tmp_path / "v")
    assert cfg.template == "vicuna_v1" and cfg.adapters[1]["num_frames"] == 2
    assert "LlavaOnevisionForConditionalGeneration" in capsys.readouterr().out


@pytest.fixture(scope="module")
def audio_model(onevision, tmp_path_factory):
    """An audio model on the same Qwen2 base and chat template: a LoRA fine-tune (4 steps) in mcomp's format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcomp.data import load_conversation_data
    from mcomp.model import MultimodalLM
    from mcomp.tiny import tiny_audio_adapter_config
    from mcomp.train import TrainConfig, train
    from tests.composition_fixtures import write_audio_data

    root = tmp_path_factory.mktemp("audio")
    llm = AutoModelForCausalLM.from_pretrained(onevision["base"])
    tokenizer = AutoTokenizer.from_pretrained(onevision["base"])
    model = MultimodalLM.build(llm, tokenizer, [tiny_audio_adapter_config()], template="chat")
    cfg = TrainConfig(stage=2, lora_r=4, lora_alpha=8, learning_rate=1e-2, max_steps=4, batch_size=3, log_every=0)
    train(model, load_conversation_data(write_audio_data(root)), cfg, root / "ckpt")
    model.save_pretrained(root / "audio")
    return {"dir": root / "audio", "media": str(root / "aud1.wav")}


def test_linear_one_zero_composition_with_a_lora_audio_model_reproduces_onevision(onevision, audio_model, tmp_path):
    from mcomp.compose_checkpoint import compose_checkpoint

    models = {"image": onevision["out"], "video": onevision["out"], "audio": audio_model["dir"]}
    weights = {"image": 1.0, "video": 1.0, "audio": 0.0}  # one model, named for two modalities: its delta once
    composed = mcomp.load(compose_checkpoint(models, tmp_path / "c", merge="linear", weights=weights))
    assert composed.template.name == "chat" and sorted(composed.modalities) == ["audio", "image", "video"]
    reference, processor = _reference(onevision["folder"])
    prompt = _prompt(composed, "<image>")
    path = onevision["images"]["long.png"]
    with Image.open(path) as img:
        inputs = processor(text=prompt, images=img.convert("RGB"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        want = reference(**inputs).logits[0]
        got = composed(composed.prepare_inputs([prompt], [{"image": path}])).logits[0]
    assert got.shape == want.shape and _relative_error(got, want) <= 1e-5


def test_ties_composes_onevision_with_a_lora_audio_model(onevision, audio_model, tmp_path):
    from mcomp.compose_checkpoint import compose_checkpoint

    models = {"image": onevision["out"], "audio": audio_model["dir"]}
    composed = mcomp.load(compose_checkpoint(models, tmp_path / "ties", merge="ties"))
    media = {"image": onevision["images"]["wide.png"], "audio": audio_model["media"]}
    for subset in (["image"], ["audio"], ["image", "audio"]):
        tags = "\n".join(f"<{m}>" for m in subset)
        prompt = _prompt(composed, tags)
        scores = composed.loglikelihood(prompt, [" a cube", " a ball"], {m: media[m] for m in subset})
        assert all(np.isfinite(s.logprob) for s in scores)
    inputs = composed.provenance["composition"]["inputs"]
    assert [(i["modality"], i["llm"]) for i in inputs] == [("image", "full fine-tune"), ("audio", "LoRA")]


def test_one_model_named_for_two_modalities_takes_one_weight(onevision, audio_model, tmp_path):
    from mcomp.compose import compose
    from mcomp.compose_checkpoint import compose_checkpoint

    models = {"image": onevision["out"], "video": onevision["out"], "audio": audio_model["dir"]}
    with pytest.raises(ValueError, match=r"is one model but its modalities have different weights"):
        compose_checkpoint(models, tmp_path / "c", merge="linear", weights={"image": 1.0, "video": 0.5})
    with pytest.raises(ValueError, match=r"is named for \['image', 'video'\]: a model of several modalities"):
        compose(models)
    with pytest.raises(ValueError, match=r"holds a model of \['image', 'video'\], not 'point'"):
        compose_checkpoint({"point": onevision["out"]}, tmp_path / "d")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
