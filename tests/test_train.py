"""`mcomp train`: what each stage trains, DAMC decoupling, resumability, data errors, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import mcomp
from mcomp.checkpoint import base_weights_sha256
from mcomp.cli import main
from mcomp.data import load_conversation_data
from mcomp.fingerprint import IdentityMismatch
from mcomp.lora import routed_layers
from mcomp.model import MultimodalLM, split_common_prefix
from mcomp.tiny import build_llm, tiny_image_adapter_config
from mcomp.train import TrainConfig, caption_text_form, lr_factor, prepare_for_training, train, trainable_parameters
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
    train(
        model,
        load_conversation_data(image_data),
        TrainConfig(stage=1, max_steps=2, batch_size=3, log_every=0),
        tmp_path,
    )
    assert model.lora_spec is None and not routed_layers(model.llm)
    assert base_weights_sha256(model.llm) == base_sum
    assert all(torch.equal(v, model.adapters["image"].encoder.state_dict()[k]) for k, v in enc.items())
    assert any(not torch.equal(v, model.adapters["image"].projector.state_dict()[k]) for k, v in proj.items())


def test_stage2_with_projector_lr_zero_keeps_the_projector(tokenizer, image_data, tmp_path):
    model = fresh_model(tokenizer)
    proj = {k: v.clone() for k, v in model.adapters["image"].projector.state_dict().items()}
    cfg = TrainConfig(stage=2, lora_r=4, max_steps=2, batch_size=3, learning_rate=1e-2, projector_lr=0.0, log_every=0)
    train(model, load_conversation_data(image_data), cfg, tmp_path)
    assert all(torch.equal(v, model.adapters["image"].projector.state_dict()[k]) for k, v in proj.items())
    layer = next(iter(routed_layers(model.llm).values()))
    assert layer.lora_B and all(b.abs().sum() > 0 for b in layer.lora_B.values())
    with pytest.raises(ValueError, match="projector_lr must be >= 0"):
        TrainConfig(projector_lr=-1e-3)


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
        [{"image": str(image_data.parent / "img0.png")}],
    )
    assert int((inputs.modality_ids == 0).sum()) == 5 + model.adapters["image"].num_tokens + 5


def test_interrupted_training_resumes_to_identical_weights(tokenizer, image_data, tmp_path):
    samples = load_conversation_data(image_data)
    cfg = TrainConfig(
        stage=2,
        decoupled=True,
        lora_r=4,
        max_steps=6,
        batch_size=2,
        learning_rate=5e-3,
        save_every=1,
        log_every=0,
        lora_dropout=0.1,
        warmup_steps=2,
        lr_scheduler="cosine",
    )
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
    with pytest.raises(IdentityMismatch, match=r"holds different work \(config.max_steps: 6 there, 7 now\)"):
        train(fresh_model(tokenizer), samples, dataclasses.replace(cfg, max_steps=7), tmp_path / "b")


@pytest.mark.parametrize("decoupled", [False, True])
def test_shared_prefix_gives_the_plain_forwards_loss_and_gradients(tokenizer, image_data, decoupled):
    model = fresh_model(tokenizer)
    prepare_for_training(model, TrainConfig(stage=2, decoupled=decoupled, lora_r=4))
    with torch.no_grad():  # LoRA B starts at zero; give every adapter a say in the forward
        for p in trainable_parameters(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    img = str(image_data.parent / "img0.png")
    conversations = [  # different lengths, a longer question and answer, two lines, and a text-only one
        [{"from": "human", "value": "image: <image>\nColour?"}, {"from": "gpt", "value": "red"}],
        [
            {"from": "human", "value": "image: <image>\nWhat colour is the thing in this picture?"},
            {"from": "gpt", "value": "a pale shade of red"},
        ],
        [{"from": "human", "value": "image: <image>\nColour and shape?"}, {"from": "gpt", "value": "red\na square"}],
        [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "blue"}],
    ]
    media = [{"image": img}, {"image": img}, {"image": img}, {}]
    results = []
    for share in (False, True):
        model.zero_grad()
        loss = model(model.prepare_conversations(conversations, media), share_prefix=share).loss
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in trainable_parameters(model).items()}))
    (plain, plain_grads), (shared, shared_grads) = results
    assert shared == pytest.approx(plain, rel=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    prefix, rest = split_common_prefix(model.prepare_conversations(conversations, media))
    system = model.tokenize(model.template.prompt("Name a colour."))
    assert prefix.inputs_embeds.shape[1] == next(
        k for k, t in enumerate(system) if t != model.tokenize(model.template.prompt("image: <image>"))[k]
    )  # the system prompt up to where the questions differ
    assert rest.attention_mask.shape[1] == prefix.inputs_embeds.shape[1] + rest.inputs_embeds.shape[1]


def test_nothing_shared_falls_back_to_the_plain_forward(tokenizer, image_data):
    model = fresh_model(tokenizer)
    inputs = model.prepare_conversations(
        [[{"from": "human", "value": "image: <image>\nColour?"}, {"from": "gpt", "value": "red"}]],
        [{"image": str(image_data.parent / "img0.png")}],
    )
    assert split_common_prefix(inputs) is None  # one row: nothing to share
    assert float(model(inputs, share_prefix=True).loss.detach()) == float(model(inputs).loss.detach())


def test_shared_prefix_falls_back_when_the_llm_keeps_no_cache(tokenizer):
    model = fresh_model(tokenizer)
    prepare_for_training(model, TrainConfig(stage=2))
    model.train()
    model.llm.activation_checkpointing_enable()  # HF then drops use_cache in training
    inputs = model.prepare_conversations(
        [
            [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "blue"}],
            [{"from": "human", "value": "Name a shape, please."}, {"from": "gpt", "value": "a square"}],
        ],
        [{}, {}],
    )
    assert split_common_prefix(inputs) is not None
    assert float(model(inputs, share_prefix=True).loss.detach()) == float(model(inputs).loss.detach())


def test_cosine_schedule_warms_up_then_decays_towards_zero():
    cfg = TrainConfig(warmup_steps=2, lr_scheduler="cosine")
    # 6 steps: 2 of warmup from 0, then a half cosine over the other 4 (values worked out by hand)
    expected = [0.0, 0.5, 1.0, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2]
    assert [lr_factor(cfg, 6, s) for s in range(6)] == pytest.approx(expected)
    assert [lr_factor(TrainConfig(), 6, s) for s in range(6)] == [1.0] * 6


@pytest.mark.parametrize("scheduler", ["cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 7), (3, 10), (5, 11)])
def test_schedule_equals_transformers_with_warmup(scheduler, warmup, total):
    """The published trainer's schedule (transformers' get_*_schedule_with_warmup), step by step."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = (
        get_cosine_schedule_with_warmup(opt, warmup, total)
        if scheduler == "cosine"
        else get_constant_schedule_with_warmup(opt, warmup)
    )
    published = []
    for _ in range(total):
        published.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    cfg = TrainConfig(warmup_steps=warmup, lr_scheduler=scheduler)
    assert [lr_factor(cfg, total, s) for s in range(total)] == pytest.approx(published, abs=1e-12)
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainConfig(lr_scheduler="linear-ish")


def test_bad_training_data_names_file_and_sample(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            [{"id": "s1", "conversations": [{"from": "human", "value": "hi"}]}, {"id": "s2", "conversations": "nope"}]
        )
    )
    with pytest.raises(ValueError, match=r"bad.json: sample s2: field 'conversations'"):
        load_conversation_data(path)
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        TrainConfig(stage=3)
    path.write_text(
        json.dumps(
            [
                {
                    "id": "s1",
                    "conversations": [{"from": "human", "value": "image: <image>"}],
                    "modal_inputs": {"image": ["a.png"]},
                    "media_captions": {"image": ["a", "b"]},
                }
            ]
        )
    )
    with pytest.raises(
        ValueError, match=r"bad.json: sample s1: media_captions\['image'\] must be one non-empty text per file"
    ):
        load_conversation_data(path)


def test_cli_trains_saves_and_the_model_loads(image_data, tmp_path, capsys):
    out = tmp_path / "model"
    code = main(
        [
            "train",
            "--base",
            "tiny",
            "--adapter",
            "tiny:image",
            "--data",
            str(image_data),
            "--stage",
            "2",
            "--decoupled",
            "--lora-r",
            "4",
            "--max-steps",
            "2",
            "--batch-size",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and "trained 2 steps" in capsys.readouterr().out
    model = mcomp.load(out)
    assert model.lora_adapters == ["text", "image"] and model.provenance["training"][0]["steps"] == 2
    assert (
        main(["train", "--base", "tiny", "--adapter", "tiny:image", "--data", str(image_data), "--out", str(out)]) == 1
    )
    assert "already exists" in capsys.readouterr().err


def _captioned(image_data):
    return [
        dataclasses.replace(s, captions={"image": [f"a {s.conversations[1]['value']} square"]})
        for s in load_conversation_data(image_data)
    ]


def _hidden_distance(model, samples) -> float:
    """Mean over layers of the squared distance between the hidden states after the media and those of
    the caption text form, over the same number of final positions (computed here independently)."""
    total = 0.0
    with torch.no_grad():
        for s in samples:
            text = [
                {**t, "value": (t["value"] or "").replace("<image>", s.captions["image"][0])}
                if t["from"] == "human"
                else t
                for t in s.conversations
            ]
            media_in = model.prepare_conversations([s.conversations], [s.media])
            k = int((media_in.modality_ids[0] == -1).flip(0).int().argmin())  # positions after the last media token
            a = model(media_in, output_hidden_states=True).hidden_states
            b = model(model.prepare_conversations([text]), output_hidden_states=True).hidden_states
            total += sum(float(((a[h][0, -k:] - b[h][0, -k:]) ** 2).mean()) for h in range(1, len(a))) / (len(a) - 1)
    return total / len(samples)


def test_caption_distillation_pulls_media_tokens_towards_their_caption(tokenizer, image_data, tmp_path):
    samples = _captioned(image_data)
    assert (
        caption_text_form(fresh_model(tokenizer), samples[0])[0]["value"]
        == f"image: {samples[0].captions['image'][0]}\nWhat colour is it?"
    )
    distances = {}
    for weight in (0.0, 1.0):
        model = fresh_model(tokenizer)
        cfg = TrainConfig(stage=1, max_steps=12, batch_size=3, learning_rate=1e-2, caption_distill=weight, log_every=0)
        train(model, samples, cfg, tmp_path / f"w{weight}")
        distances[weight] = _hidden_distance(model, samples)
    assert distances[1.0] < 0.8 * distances[0.0]


def test_caption_distillation_needs_captions_and_stage_1(tokenizer, image_data, tmp_path):
    with pytest.raises(ValueError, match="caption_distill is a stage-1 setting"):
        TrainConfig(stage=2, caption_distill=1.0)
    samples = load_conversation_data(image_data)
    with pytest.raises(ValueError, match=f"missing in sample.*{samples[0].id}"):
        train(fresh_model(tokenizer), samples, TrainConfig(stage=1, max_steps=1, caption_distill=1.0), tmp_path)


def test_checkpoints_carry_every_cuda_devices_random_state(tmp_path, monkeypatch):
    """LoRA dropout on a GPU draws from the device's generator: a resume must restore it too."""
    from mcomp.io import load_tensors, save_tensors
    from mcomp.train import _rng_states, _set_rng_states

    device_states = [torch.arange(16, dtype=torch.uint8) + i for i in range(2)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in device_states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    save_tensors(_rng_states(), tmp_path / "rng.safetensors")
    cpu = torch.get_rng_state()
    torch.rand(3)  # move the CPU generator on
    tensors = load_tensors(tmp_path / "rng.safetensors")
    _set_rng_states(dict(tensors), tmp_path)
    assert torch.equal(torch.get_rng_state(), cpu)
    assert [s.tolist() for s in restored] == [s.tolist() for s in device_states]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="random state of 2 CUDA device\\(s\\), this process has 1"):
        _set_rng_states(dict(tensors), tmp_path)
