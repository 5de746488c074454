"""`mcomp import llava-hf` against transformers itself: a tiny LlavaForConditionalGeneration (the real
classes, config and key names, random init) saved with its processor, imported as an mcomp model whose
LLM is a full fine-tune of a base; pixel values, logits and greedy generations compared with the
transformers model's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mcomp
from mcomp.checkpoint import read_config
from mcomp.interop.llava_hf import import_llava_hf

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
)


def fine_tune_of(model, base, vocab: int, seed: int) -> None:
    """Set `model`'s language model to the base plus a small delta (rows past `vocab` stay random)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        own = model.model.language_model.state_dict()
        for key, value in base.model.state_dict().items():
            noise = torch.randn(value.shape, generator=g)
            own[key][: value.shape[0]].copy_(value + 0.02 * value.std() * noise)
        head = base.lm_head.weight
        model.lm_head.weight[:vocab].copy_(head + 0.02 * head.std() * torch.randn(head.shape, generator=g))


def tiny_video_llava(root, base_dir, vocab: int):
    """A Video-LLaVA folder as transformers saves it, fine-tuned from the same base."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        VideoLlavaConfig,
        VideoLlavaForConditionalGeneration,
        VideoLlavaImageProcessor,
        VideoLlavaProcessor,
        VideoLlavaVideoProcessor,
    )

    from mcomp.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"], "pad_token": "<pad>"})
    config = VideoLlavaConfig(
        text_config=LlamaConfig(vocab_size=vocab + 3, pad_token_id=tokenizer.pad_token_id, **TEXT),
        vision_config=CLIPVisionConfig(**VISION),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=16,
        video_seq_length=8 * 17,
    )
    torch.manual_seed(5)
    model = VideoLlavaForConditionalGeneration(config).eval()
    fine_tune_of(model, LlamaForCausalLM.from_pretrained(base_dir), vocab, seed=6)
    model.save_pretrained(root / "video-llava")
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    VideoLlavaProcessor(
        image_processor=VideoLlavaImageProcessor(**size),
        video_processor=VideoLlavaVideoProcessor(**size),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(root / "video-llava")
    return root / "video-llava"


def tiny_llava(root):
    """(folder, base folder, base vocabulary size): the LLaVA folder as transformers saves it, and a base
    whose weights the LLaVA language model is a small fine-tune of."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from mcomp.tiny import build_tokenizer

    base_tokenizer = build_tokenizer()
    vocab = len(base_tokenizer)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TEXT)).eval()
    base.save_pretrained(root / "base")
    base_tokenizer.save_pretrained(root / "base")

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    config = LlavaConfig(
        text_config=LlamaConfig(vocab_size=vocab + 2, pad_token_id=tokenizer.pad_token_id, **TEXT),
        vision_config=CLIPVisionConfig(**VISION),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=16,
    )
    model = LlavaForConditionalGeneration(config).eval()
    fine_tune_of(model, base, vocab, seed=1)
    model.save_pretrained(root / "llava")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template="{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }} {% endfor %}ASSISTANT:",
    )
    processor.save_pretrained(root / "llava")
    return root / "llava", root / "base", vocab


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    folder, base, vocab = tiny_llava(root)
    out = import_llava_hf(folder, root / "mcomp", base=base)
    video_folder = tiny_video_llava(root, base, vocab)
    video_out = import_llava_hf(video_folder, root / "mcomp-video", base=base)
    from mcomp.world.render_video import write_mp4

    rng = np.random.default_rng(3)
    write_mp4(str(root / "clip.mp4"), [rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8) for _ in range(12)])
    images = {}
    rng = np.random.default_rng(0)
    for name, size in {"wide.png": (40, 30), "tall.png": (17, 50), "square.png": (64, 64), "odd.jpg": (33, 21)}.items():
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        images[name] = str(root / name)
    return {
        "folder": folder,
        "base": base,
        "vocab": vocab,
        "out": out,
        "images": images,
        "video_folder": video_folder,
        "video_out": video_out,
        "video": str(root / "clip.mp4"),
    }


def _reference(folder):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def test_pixel_values_are_the_folders_processor_output(imported):
    _, processor = _reference(imported["folder"])
    model = mcomp.load(imported["out"])
    for name, path in imported["images"].items():
        with Image.open(path) as img:
            want = processor.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
        got = model.adapters["image"].input_tensor(path)
        assert torch.equal(got, want), name


@pytest.mark.parametrize("image", ["wide.png", "tall.png"])
def test_logits_equal_the_transformers_models(imported, image):
    reference, processor = _reference(imported["folder"])
    model = mcomp.load(imported["out"])
    with Image.open(imported["images"][image]) as img:
        inputs = processor(text=PROMPT, images=img.convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        want = reference(**inputs).logits[0, :, : imported["vocab"]]
        got = model(model.prepare_inputs([PROMPT], [{"image": imported["images"][image]}])).logits[0]
    assert got.shape == want.shape  # the same tokens: the <image> token in place, 16 patch features
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_greedy_generations_are_identical(imported):
    reference, processor = _reference(imported["folder"])
    model = mcomp.load(imported["out"])
    vocab = imported["vocab"]
    path = imported["images"]["square.png"]
    with Image.open(path) as img:
        inputs = processor(text=PROMPT, images=img.convert("RGB"), return_tensors="pt")
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        # the <image> and pad tokens are not text: mcomp's LLM has no rows for them
        want = reference.generate(**inputs, suppress_tokens=[vocab, vocab + 1], **settings)[0, -10:]
        prepared = model.prepare_inputs([PROMPT], [{"image": path}])
        got = model.llm.generate(
            inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask, **settings
        )
    assert got[0].tolist() == want.tolist()


def test_the_import_records_what_it_did(imported):
    cfg = read_config(imported["out"])
    record = cfg.provenance["import"]
    assert cfg.llm == "llm" and record["architecture"] == "LlavaForConditionalGeneration"
    assert 0 < record["relative_delta"] < 0.1
    assert record["vocabulary_rows_dropped"] == [imported["vocab"], imported["vocab"] + 1]
    assert json.loads(json.dumps(cfg.adapters[0]))["select_layer"] == -2


def test_a_base_it_was_not_fine_tuned_from_is_refused(imported, tmp_path):
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM.from_pretrained(imported["base"])
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn_like(p) * p.std())
    other.save_pretrained(tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "other" / name).write_bytes((imported["base"] / name).read_bytes())
    with pytest.raises(ValueError, match=r"evidently not fine-tuned from this base"):
        import_llava_hf(imported["folder"], tmp_path / "out", base=tmp_path / "other")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def lora_models(imported, tmp_path_factory):
    """Audio and point models: LoRA fine-tunes (4 steps) of the same base, in mcomp's format."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcomp.data import load_conversation_data
    from mcomp.model import MultimodalLM
    from mcomp.tiny import tiny_audio_adapter_config, tiny_point_adapter_config
    from mcomp.train import TrainConfig, train
    from tests.composition_fixtures import write_audio_data, write_point_data

    root = tmp_path_factory.mktemp("lora")
    data = {"audio": write_audio_data(root), "point": write_point_data(root)}
    adapters = {"audio": tiny_audio_adapter_config(), "point": tiny_point_adapter_config()}
    out = {"root": root}
    for modality in ("audio", "point"):
        llm = AutoModelForCausalLM.from_pretrained(imported["base"])
        model = MultimodalLM.build(llm, AutoTokenizer.from_pretrained(imported["base"]), [adapters[modality]])
        cfg = TrainConfig(stage=2, lora_r=4, lora_alpha=8, learning_rate=1e-2, max_steps=4, batch_size=3, log_every=0)
        train(model, load_conversation_data(data[modality]), cfg, root / f"ckpt-{modality}")
        model.save_pretrained(root / modality)
        out[modality] = root / modality
    out["media"] = {"audio": str(root / "aud1.wav"), "point": str(root / "p0.npy")}
    return out


def test_linear_one_zero_composition_reproduces_the_llava_hf_model(imported, lora_models, tmp_path):
    from mcomp.compose_checkpoint import compose_checkpoint

    models = {"image": imported["out"], "audio": lora_models["audio"], "point": lora_models["point"]}
    out = compose_checkpoint(models, tmp_path / "c", merge="linear", weights={"image": 1.0, "audio": 0.0, "point": 0.0})
    composed = mcomp.load(out)
    reference, processor = _reference(imported["folder"])
    path = imported["images"]["wide.png"]
    with Image.open(path) as img:
        inputs = processor(text=PROMPT, images=img.convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        want = reference(**inputs).logits[0, :, : imported["vocab"]]
        got = composed(composed.prepare_inputs([PROMPT], [{"image": path}])).logits[0]
    assert got.shape == want.shape
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("merge", ["ties", "dare_ties", "pcb", "tsv", "iso_cts"])
def test_every_backend_composes_llava_hf_with_lora_models(imported, lora_models, tmp_path, merge):
    from mcomp.compose_checkpoint import compose_checkpoint

    models = {"image": imported["out"], "audio": lora_models["audio"], "point": lora_models["point"]}
    composed = mcomp.load(compose_checkpoint(models, tmp_path / merge, merge=merge))
    media = {"image": imported["images"]["tall.png"], **lora_models["media"]}
    lines = {"image": "image: <image>", "audio": "audio: <audio>", "point": "point: <point>"}
    for subset in (["image"], ["audio"], ["image", "audio", "point"]):
        prompt = composed.template.prompt("\n".join([lines[m] for m in subset] + ["What do they share?"]))
        scores = composed.loglikelihood(prompt, [" a cube", " a ball"], {m: media[m] for m in subset})
        assert all(np.isfinite(s.logprob) for s in scores)
    record = composed.provenance["composition"]
    assert record["merge"] == merge and [i["llm"] for i in record["inputs"]] == ["full fine-tune", "LoRA", "LoRA"]


def test_the_cli_imports_and_the_model_answers(imported, tmp_path, capsys):
    from mcomp.cli import main
    from tests.test_train_identity import files_of

    out = tmp_path / "cli"
    assert (
        main(["import", "llava-hf", str(imported["folder"]), "--base", str(imported["base"]), "--out", str(out)]) == 0
    )
    assert "relative delta to the base" in capsys.readouterr().out
    cli_llm = sorted(p.name for p in (out / "llm").iterdir())
    assert cli_llm == sorted(p.name for p in (imported["out"] / "llm").iterdir())
    assert read_config(out).llm_sha256 == read_config(imported["out"]).llm_sha256
    again = tmp_path / "again"  # its recipe imports it again, byte for byte
    assert main(["import", "llava-hf", "--from", str(out / "mcomp_recipe.yaml"), "--out", str(again)]) == 0
    assert files_of(again) == files_of(out)


def test_video_pixel_values_are_the_folders_video_processor_output(imported):
    from transformers import AutoVideoProcessor

    from mcomp.encoders.video import read_video_frames

    model = mcomp.load(imported["video_out"])
    frames = read_video_frames(imported["video"], 8)
    want = AutoVideoProcessor.from_pretrained(imported["video_folder"])(videos=[frames], return_tensors="pt")
    got = model.adapters["video"].input_tensor(imported["video"])
    assert got.shape == (8, 3, 32, 32) and torch.equal(got, want["pixel_values_videos"][0])


def test_video_llava_logits_equal_the_transformers_models(imported):
    from transformers import AutoProcessor, VideoLlavaForConditionalGeneration

    from mcomp.encoders.video import read_video_frames

    reference = VideoLlavaForConditionalGeneration.from_pretrained(imported["video_folder"]).eval()
    processor = AutoProcessor.from_pretrained(imported["video_folder"])
    model = mcomp.load(imported["video_out"])
    prompt = "USER: <video>\nWhat happens in the clip? ASSISTANT:"
    frames = read_video_frames(imported["video"], 8)
    inputs = processor(text=prompt, videos=[frames], return_tensors="pt")
    with torch.no_grad():
        want = reference(**inputs).logits[0, :, : imported["vocab"]]
        got = model(model.prepare_inputs([prompt], [{"video": imported["video"]}])).logits[0]
    assert got.shape == want.shape  # 8 frames x (16 patches + CLS) in place of <video>
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_llava_video_llava_audio_and_point_compose_and_evaluate_on_mcub4(imported, lora_models, tmp_path):
    from mcomp.cli import main
    from mcomp.world import generate_world

    models = {
        "image": imported["out"],
        "video": imported["video_out"],
        "audio": lora_models["audio"],
        "point": lora_models["point"],
    }
    pairs = ",".join(f"{m}={p}" for m, p in models.items())
    assert main(["compose", "--models", pairs, "--merge", "ties", "--out", str(tmp_path / "four")]) == 0
    world = generate_world(tmp_path / "world", size="test", seed=0)
    run = tmp_path / "run"
    args = ["eval", "--model", str(tmp_path / "four"), "--task", "mcub4", "--mode", "loglik"]
    assert main([*args, "--data-root", str(world.mcub_root("test")), "--out", str(run)]) == 0
    from mcomp.benchmarks.mcub.results import ResultsFile

    results = ResultsFile.read(run / "results.json")
    questions = json.loads(world.mcub_questions("test", "MCUB-4").read_text())
    row = next(r for r in results.results if r.subset == "MCUB-4" and r.metric == "accuracy")
    assert row.n_samples == len(questions) and row.n_errors == 0 and 0.0 <= row.value <= 100.0
    assert sorted(results.model["modalities"]) == ["audio", "image", "point", "video"]


def test_tokenizers_compose_when_they_differ_only_by_added_special_tokens():
    from tokenizers import normalizers

    from mcomp.tiny import build_tokenizer
    from mcomp.tokenization import convention_difference, vocabulary_difference

    base = build_tokenizer()
    specials = build_tokenizer()
    specials.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    assert vocabulary_difference(base, specials) is None and convention_difference(base, specials) is None
    ordinary = build_tokenizer()
    ordinary.add_tokens(["zebra"])
    assert "ordinary tokens" in vocabulary_difference(base, ordinary)
    lower = build_tokenizer()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert vocabulary_difference(base, lower) is None
    assert convention_difference(base, lower).startswith("'Hello world' becomes")


def test_template_chat_takes_the_folders_own_chat_template(imported, tmp_path):
    """LLaVA-1.5's tokenizer has no chat template: its processor's is the folder's, rendered as transformers does."""
    from transformers import AutoProcessor

    out = import_llava_hf(imported["folder"], tmp_path / "chat", base=imported["base"], template="chat")
    model = mcomp.load(out)
    processor = AutoProcessor.from_pretrained(imported["folder"])
    messages = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
    want = processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=True
    )
    assert read_config(out).template == "chat" and model.template.prompt(messages[0]["content"]) == want
    assert read_config(imported["out"]).template == "vicuna_v1"  # the default: the conversation it was trained with
