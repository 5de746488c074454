"""`mcomp train`: what each stage trains, DAMC decoupling, resumability, data errors, CLI."""
from __future__ import annotations

import json

import pytest
import torch

import mcomp
from mcomp.checkpoint import base_weights_sha256
from mcomp.cli import main
from mcomp.data import load_conversation_data
from mcomp.lora import routed_layers
from mcomp.model import MultimodalLM
from mcomp.tiny import build_llm, tiny_image_adapter_config
from mcomp.train import TrainConfig, lr_factor, train, trainable_parameters
from tests.composition_fixtures import write_image_data


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    return write_image_data(tmp_path_factory.mktemp("train_data"))


def fresh_model(tokenizer):
    return MultimodalLM.build(build_llm(tokenizer, seed=0), tokenizer, [tiny_image_adapter_config()])


def test_stage1_trains_only_the_projector(tokenizer, image_data, tmp_path):
    model = fresh_model(tokenizer)
    base_sum = base_weights_sha256(model.llm)
    enc = {k: v.clone() for k, v in model.adapters["image"].encoder.state_dict().items()}
    proj = {k: v.clone() for k, v in model.adapters["image"].projector.state_dict().items()}
    train(model, load_conversation_data(image_data), TrainConfig(stage=1, max_steps=2, batch_size=3, log_every=0), tmp_path)
    assert model.lora_spec is None and not routed_layers(model.llm)
    assert base_weights_sha256(model.llm) == base_sum
    assert all(torch.equal(v, model.adapters["image"].encoder.state_dict()[k]) for k, v in enc.items())
    assert any(not torch.equal(v, model.adapters["image"].projector.state_dict()[k]) for k, v in proj.items())


def test_stage2_decoupled_adds_text_and_modality_lora_and_tokens(tokenizer, image_data, tmp_path):
    model = fresh_model(tokenizer)
    cfg = TrainConfig(stage=2, decoupled=True, lora_r=4, max_steps=3, batch_size=3, learning_rate=1e-2, log_every=0)
    summary = train(model, load_conversation_data(image_data), cfg, tmp_path)
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    assert model.lora_adapters == ["text", "image"]
    assert model.routing.routes == {"text": [("text", 1.0)], "image": [("image", 1.0)]}
    assert model.prefix_tokens["image"].shape == (5, 64) and model.suffix_tokens["image"].shape == (5, 64)
    layer = next(iter(routed_layers(model.llm).values()))
    assert layer.lora_B["text"].abs().sum() > 0 and layer.lora_B["image"].abs().sum() > 0
    assert model.prefix_tokens["image"].abs().sum() > 0  # trained away from the zero init
    inputs = model.prepare_conversations(
        [[{"from": "human", "value": "image: <image>\nColour?"}, {"from": "gpt", "value": "red"}]],
        [{"image": str(image_data.parent / "img0.png")}])
    assert int((inputs.modality_ids == 0).sum()) == 5 + model.adapters["image"].num_tokens + 5


def test_interrupted_training_resumes_to_identical_weights(tokenizer, image_data, tmp_path):
    samples = load_conversation_data(image_data)
    cfg = TrainConfig(stage=2, decoupled=True, lora_r=4, max_steps=6, batch_size=2, learning_rate=5e-3,
                      save_every=1, log_every=0, lora_dropout=0.1, warmup_steps=2, lr_scheduler="cosine")
    straight = fresh_model(tokenizer)
    train(straight, samples, cfg, tmp_path / "a")
    resumed = fresh_model(tokenizer)
    first = train(resumed, samples, cfg, tmp_path / "b", stop_after=3)
    assert first["steps"] == 3
    again = fresh_model(tokenizer)  # a new process would start from scratch and find the checkpoint
    second = train(again, samples, cfg, tmp_path / "b")
    assert second["steps"] == 6 and len(second["losses"]) == 6
    a, b = trainable_parameters(straight), trainable_parameters(again)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(ValueError, match="different training config"):
        train(fresh_model(tokenizer), samples, TrainConfig(stage=2, max_steps=7, log_every=0), tmp_path / "b")


def test_cosine_schedule_warms_up_then_decays_towards_zero():
    cfg = TrainConfig(warmup_steps=2, lr_scheduler="cosine")
    # 6 steps: 2 of warmup, then a half cosine over the other 4 (values worked out by hand)
    expected = [0.5, 1.0, 1.0, (1 + 2 ** -0.5) / 2, 0.5, (1 - 2 ** -0.5) / 2]
    assert [lr_factor(cfg, 6, s) for s in range(6)] == pytest.approx(expected)
    assert [lr_factor(TrainConfig(), 6, s) for s in range(6)] == [1.0] * 6
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainConfig(lr_scheduler="linear-ish")


def test_bad_training_data_names_file_and_sample(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"id": "s1", "conversations": [{"from": "human", "value": "hi"}]},
                                {"id": "s2", "conversations": "nope"}]))
    with pytest.raises(ValueError, match=r"bad.json: sample s2: field 'conversations'"):
        load_conversation_data(path)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        TrainConfig(stage=3)


def test_cli_trains_saves_and_the_model_loads(image_data, tmp_path, capsys):
    out = tmp_path / "model"
    code = main(["train", "--base", "tiny", "--adapter", "tiny:image", "--data", str(image_data), "--stage", "2",
                 "--decoupled", "--lora-r", "4", "--max-steps", "2", "--batch-size", "3", "--out", str(out)])
    assert code == 0 and "trained 2 steps" in capsys.readouterr().out
    model = mcomp.load(out)
    assert model.lora_adapters == ["text", "image"] and model.provenance["training"][0]["steps"] == 2
    assert main(["train", "--base", "tiny", "--adapter", "tiny:image", "--data", str(image_data), "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
