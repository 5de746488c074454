"""`mcomp train --recipe modelcompose`: the released training scripts' hyper-parameters, learning-rate
groups and schedule (issue 27, item 6).

PUBLISHED restates what each released script passes (scripts/model_composition/train/*.sh at 7846997:
--lora_r 128 --lora_alpha 256, --mm_projector_lr, --learning_rate, --per_device_train_batch_size x
--gradient_accumulation_steps x 8 GPUs, --num_train_epochs, --warmup_ratio 0.03, cosine, weight decay 0,
dataloader_drop_last; LoRA dropout 0.05 is the LoRA config's default in multimodal_llama.py), keyed by
the lora_strategy each runs ("same": one LoRA; "modal+language": DAMC; the point scripts' names are
swapped) and by whether it sets --mm_language_lr (the text LoRA then joins the projector's group).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mcomp.cli import main
from mcomp.recipes import recipe_fields
from mcomp.train import (
    TrainConfig,
    lr_factor,
    optimizer_groups,
    prepare_for_training,
    trainable_parameters,
    warmup_steps,
)
from tests.composition_fixtures import write_image_data

GPUS = 8
# modality, kind: (learning_rate, mm_projector_lr, per-device batch, grad accumulation, epochs, mm_language_lr set)
PUBLISHED = {
    ("image", "stage1"): (1e-3, None, 32, 1, 1, False),
    ("image", "naivemc"): (2e-4, 2e-5, 4, 4, 1, False),
    ("image", "damc"): (2e-4, 2e-5, 4, 4, 1, True),
    ("audio", "stage1"): (1e-4, None, 16, 1, 1, False),
    ("audio", "naivemc"): (2e-5, 2e-5, 8, 2, 1, False),
    ("audio", "damc"): (1e-5, 2e-5, 8, 2, 1, True),
    ("video", "naivemc"): (2e-4, 2e-5, 4, 4, 1, False),
    ("video", "damc"): (2e-4, 2e-5, 4, 4, 1, False),
    ("point", "stage1"): (2e-3, None, 16, 1, 3, False),
    ("point", "naivemc"): (2e-5, 2e-5, 4, 1, 3, False),  # run_finetune_point_damc.sh (lora_strategy same)
    ("point", "damc"): (2e-5, 2e-5, 4, 1, 3, False),  # run_finetune_point_naive_mc.sh (modal+language)
}
KINDS = {"stage1": (1, False), "naivemc": (2, False), "damc": (2, True)}


@pytest.mark.parametrize("modality,kind", sorted(PUBLISHED))
def test_recipe_is_the_released_scripts(modality, kind):
    lr, projector_lr, batch, accum, epochs, language_lr = PUBLISHED[(modality, kind)]
    stage, decoupled = KINDS[kind]
    cfg = TrainConfig.from_dict(recipe_fields("modelcompose", modality, stage, decoupled))
    assert (cfg.stage, cfg.decoupled) == (stage, decoupled)
    assert (cfg.learning_rate, cfg.projector_lr, cfg.epochs) == (lr, projector_lr, epochs)
    assert (cfg.batch_size, cfg.global_batch_size) == (batch, batch * accum * GPUS)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (128, 256, 0.05)
    assert sorted(cfg.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert (cfg.lr_scheduler, cfg.warmup_ratio, cfg.warmup_steps, cfg.weight_decay) == ("cosine", 0.03, 0, 0.0)
    assert cfg.drop_last and cfg.text_lora_with_projector == language_lr
    if decoupled:
        assert (cfg.prefix_tokens, cfg.suffix_tokens) == (5, 5)


def test_recipe_refuses_what_was_not_released():
    with pytest.raises(ValueError, match="recipe 'modelcompose' has no stage1 run for video"):
        recipe_fields("modelcompose", "video", 1, False)
    with pytest.raises(ValueError, match="unknown training recipe 'llava'; available: .*modelcompose"):
        recipe_fields("llava", "image", 2, False)


def test_warmup_ratio_and_cosine_are_the_trainers():
    """transformers' Trainer: warmup steps = ceil(total x warmup_ratio), then get_cosine_schedule_with_warmup."""
    from transformers import get_cosine_schedule_with_warmup

    cfg = TrainConfig(lr_scheduler="cosine", warmup_ratio=0.03)
    for total in (1, 33, 34, 100, 1234):
        assert warmup_steps(cfg, total) == math.ceil(total * 0.03)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ref = get_cosine_schedule_with_warmup(opt, math.ceil(total * 0.03), total)
        published = []
        for _ in range(total):
            published.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
        assert [lr_factor(cfg, total, s) for s in range(total)] == pytest.approx(published, abs=1e-12)


@pytest.mark.parametrize("with_projector", [False, True])
def test_text_lora_joins_the_projector_group_as_published(tiny_model, with_projector):
    """llava_trainer.create_optimizer: the projector's parameters, plus every `lora_A.default` /
    `lora_B.default` (the text LoRA) when mm_language_lr is set, at mm_projector_lr; the rest (the
    modality LoRA, the prefix/suffix tokens) at learning_rate."""
    cfg = TrainConfig(
        stage=2,
        decoupled=True,
        lora_r=2,
        learning_rate=2e-4,
        projector_lr=2e-5,
        text_lora_with_projector=with_projector,
    )
    prepare_for_training(tiny_model, cfg)
    params = trainable_parameters(tiny_model)
    published_names = {n for n in params if ".projector." in n}  # mm_projector / modal_projectors
    if with_projector:
        published_names |= {n for n in params if ".lora_A.text" in n or ".lora_B.text" in n}  # "default"
    groups = optimizer_groups(params, cfg)
    by_id = {id(p): n for n, p in params.items()}
    assert groups[0]["lr"] == 2e-5 and {by_id[id(p)] for p in groups[0]["params"]} == published_names
    assert groups[1]["lr"] == 2e-4 and {by_id[id(p)] for p in groups[1]["params"]} == set(params) - published_names
    assert any(".lora_A.image" in n for n in set(params) - published_names)  # the modality LoRA stays apart


def test_cli_trains_with_the_recipe(tmp_path, capsys):
    data = write_image_data(tmp_path)
    out = tmp_path / "model"
    code = main(
        [
            "train",
            "--recipe",
            "modelcompose",
            "--base",
            "tiny",
            "--adapter",
            "tiny:image",
            "--data",
            str(data),
            "--stage",
            "2",
            "--decoupled",
            "--lora-r",
            "4",
            "--batch-size",
            "1",
            "--global-batch-size",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    config = json.loads((out / "mcomp_config.json").read_text())["provenance"]["training"][0]["config"]
    assert (config["lora_alpha"], config["lora_dropout"], config["lr_scheduler"], config["warmup_ratio"]) == (
        256,
        0.05,
        "cosine",
        0.03,
    )
    assert (config["learning_rate"], config["projector_lr"], config["text_lora_with_projector"]) == (2e-4, 2e-5, True)
    assert config["lora_r"] == 4 and config["batch_size"] == 1  # flags override the recipe
    # 3 samples, batches of 1, 2 per step, drop_last: 3 micro-batches make 2 optimizer steps (ceil(3 / 2))
    assert "trained 2 steps" in capsys.readouterr().out


def test_schedule_steps_once_per_optimizer_step(tokenizer, tmp_path):
    """With gradient accumulation the learning rate moves once per optimizer step (the Trainer's
    schedule counts optimizer steps), for every group."""
    from mcomp.data import load_conversation_data
    from mcomp.train import train
    from tests.test_train import fresh_model

    samples = load_conversation_data(write_image_data(tmp_path)) * 4  # 12 samples
    cfg = TrainConfig(
        stage=2,
        lora_r=2,
        batch_size=1,
        grad_accum=3,
        lr_scheduler="cosine",
        warmup_ratio=0.3,
        learning_rate=1e-3,
        projector_lr=1e-4,
        log_every=0,
    )
    summary = train(fresh_model(tokenizer), samples, cfg, tmp_path / "ckpt")
    total = summary["total_steps"]
    assert (summary["grad_accum"], total) == (3, 4) and summary["steps"] == 4
    want = [peak * lr_factor(cfg, total, s) for s in range(total) for peak in (1e-4, 1e-3)]  # projector, rest
    assert [lr for rates in summary["learning_rates"] for lr in rates] == pytest.approx(want, abs=1e-15)
    assert want[2:4] == pytest.approx([5e-5, 5e-4])  # half way up the two warmup steps (ceil(0.3 x 4) = 2)
