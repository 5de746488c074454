"""Modality models whose LLM is a full fine-tune: trained (`TrainConfig(full=True)`), saved as
sharded safetensors with their base reference and checksum, loaded, and composed with LoRA models
through the streaming merge engine (NaiveMC; DAMC is refused)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mcomp
from mcomp.checkpoint import read_config
from mcomp.compose_checkpoint import compose_checkpoint
from mcomp.merge import merge_state_dicts
from mcomp.merge.lora import load_lora
from tests.composition_fixtures import write_audio_data, write_image_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base saved to a folder; the image model fully fine-tuned from it, the audio model a
    LoRA of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcomp.data import load_conversation_data
    from mcomp.model import MultimodalLM
    from mcomp.tiny import build_llm, build_tokenizer, tiny_audio_adapter_config, tiny_image_adapter_config
    from mcomp.train import TrainConfig, train

    root = tmp_path_factory.mktemp("full")
    tokenizer = build_tokenizer()
    build_llm(tokenizer, seed=0).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    tokenizer = AutoTokenizer.from_pretrained(root / "base")  # as `mcomp train --base` loads it
    data = {"image": write_image_data(root), "audio": write_audio_data(root)}
    adapters = {"image": tiny_image_adapter_config(), "audio": tiny_audio_adapter_config()}
    out = {"root": root, "base": root / "base"}
    for modality, full in (("image", True), ("audio", False)):
        llm = AutoModelForCausalLM.from_pretrained(root / "base")
        model = MultimodalLM.build(llm, tokenizer, [adapters[modality]])
        cfg = TrainConfig(
            stage=2,
            full=full,
            lora_r=4,
            lora_alpha=8,
            learning_rate=3e-3 if full else 1e-2,
            max_steps=4,
            batch_size=3,
            seed=1,
            log_every=0,
        )
        train(model, load_conversation_data(data[modality]), cfg, root / f"ckpt-{modality}")
        model.save_pretrained(root / modality)
        out[modality] = root / modality
        out[f"{modality}_memory"] = model
    out["media"] = {"image": str(root / "img0.png"), "audio": str(root / "aud2.wav")}
    return out


def _logits(model, media: dict) -> torch.Tensor:
    lines = [f"{m}: {model.adapters[m].placeholder}" for m in ("image", "audio") if m in media]
    with torch.no_grad():
        inputs = model.prepare_inputs([model.template.prompt("\n".join(lines + ["What is it?"]))], [media])
        return model(inputs).logits


def _llm_dir(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((path / "llm").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_a_full_fine_tune_saves_as_shards_with_its_base_and_loads(models):
    cfg = read_config(models["image"])
    assert cfg.llm == "llm" and cfg.lora is None and len(cfg.llm_sha256) == 64
    assert cfg.base_model == str(models["base"].resolve())
    base = load_file(models["base"] / "model.safetensors")
    tuned = _llm_dir(models["image"])
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(changed) > 10  # the LLM itself was trained, not only the projector
    loaded = mcomp.load(models["image"])
    media = {"image": models["media"]["image"]}
    torch.testing.assert_close(_logits(loaded, media), _logits(models["image_memory"], media), rtol=0, atol=0)
    assert loaded.finetuned_from["base_model_sha256"] == cfg.base_model_sha256


def test_a_changed_weight_file_is_refused_on_load(models, tmp_path):
    import shutil

    copy = tmp_path / "image"
    shutil.copytree(models["image"], copy)
    shard = sorted((copy / "llm").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="llm_sha256"):
        mcomp.load(copy)


def test_linear_with_coefficients_one_and_zero_reproduces_the_full_fine_tune(models, tmp_path):
    out = compose_checkpoint(
        {"image": models["image"], "audio": models["audio"]},
        tmp_path / "c",
        merge="linear",
        weights={"image": 1.0, "audio": 0.0},
    )
    composed = mcomp.load(out)
    assert composed.modalities == ["image", "audio"]
    media = {"image": models["media"]["image"]}
    torch.testing.assert_close(_logits(composed, media), _logits(models["image_memory"], media), rtol=1e-5, atol=1e-6)
    both = _logits(composed, models["media"])  # any subset of the modalities
    assert torch.isfinite(both).all()


@pytest.mark.parametrize("merge", ["linear", "ties", "dare_ties", "pcb"])
def test_every_backend_merges_full_and_lora_deltas_as_the_engine_does_in_memory(models, tmp_path, merge):
    """The written LLM equals an independent in-memory merge of the two task vectors: the full
    fine-tune's W_ft − W_base and the LoRA's s·B·A (computed here from the peft files)."""
    out = compose_checkpoint(
        {"image": models["image"], "audio": models["audio"]}, tmp_path / merge, merge=merge, seed=3
    )
    base = load_file(models["base"] / "model.safetensors")
    tuned = _llm_dir(models["image"])
    lora = load_lora(models["audio"] / "lora" / "text")
    with_lora = {k: v.clone() for k, v in base.items()}
    for key, module in lora.modules.items():
        with_lora[key] = base[key] + module.delta().to(base[key].dtype)
    method = "task_arithmetic" if merge == "linear" else merge
    weights = [0.5, 0.5] if merge == "linear" else [1.0, 1.0]
    params = {"seed": 3} if merge == "dare_ties" else {}
    want = merge_state_dicts(base, [tuned, with_lora], method, weights=weights, **params)
    got = _llm_dir(out)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    composed = mcomp.load(out)
    record = json.loads((out / "mcomp_config.json").read_text())["provenance"]["composition"]
    assert record["merge"] == merge and [i["llm"] for i in record["inputs"]] == ["full fine-tune", "LoRA"]
    assert torch.isfinite(_logits(composed, models["media"])).all()


def test_damc_with_a_full_fine_tune_is_refused_with_the_reason(models, tmp_path):
    with pytest.raises(ValueError, match="a full fine-tune has no such split"):
        compose_checkpoint({"image": models["image"], "audio": models["audio"]}, tmp_path / "d", method="damc")
    assert not (tmp_path / "d").exists()


def test_the_cli_trains_a_full_fine_tune_and_composes_it_on_disk(models, tmp_path, capsys):
    from mcomp.cli import main
    from tests.test_train_identity import files_of

    data = models["root"] / "image_train.json"
    args = ["train", "--base", str(models["base"]), "--adapter", "tiny:image", "--data", str(data)]
    args += ["--stage", "2", "--full", "--max-steps", "2", "--batch-size", "3", "--out", str(tmp_path / "img")]
    assert main(args) == 0
    cfg = read_config(tmp_path / "img")
    assert cfg.llm == "llm" and cfg.base_model == str(models["base"].resolve())
    pairs = f"image={tmp_path / 'img'},audio={models['audio']}"
    capsys.readouterr()
    assert main(["compose", "--models", pairs, "--method", "damc", "--out", str(tmp_path / "d")]) != 0
    assert "a full fine-tune has no such split" in capsys.readouterr().err
    assert main(["compose", "--models", pairs, "--merge", "ties", "--lora-rank", "4", "--out", str(tmp_path / "r")])
    assert "--lora-rank: not available" in capsys.readouterr().err
    assert main(["compose", "--models", pairs, "--merge", "ties", "--out", str(tmp_path / "c")]) == 0
    assert "streamed to disk" in capsys.readouterr().out
    composed = mcomp.load(tmp_path / "c")
    assert composed.modalities == ["image", "audio"] and composed.finetuned_from is not None
    assert torch.isfinite(_logits(composed, models["media"])).all()
    # the full fine-tune and the streamed composition each carry a recipe that makes them again, byte for byte
    for out in ("img", "c"):
        command = "train" if out == "img" else "compose"
        again = tmp_path / f"{out}-again"
        assert main([command, "--from", str(tmp_path / out / "mcomp_recipe.yaml"), "--out", str(again)]) == 0
        assert files_of(again) == files_of(tmp_path / out), out
