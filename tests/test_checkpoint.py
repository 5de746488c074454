"""Checkpoint of a single-modality MLLM: safetensors only, bit-exact round trip, base checks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import mcomp
from mcomp import checkpoint as ckpt


def outputs(model, image_path):
    prompt = model.template.prompt("image: <image>\nWhat is it?")
    media = [{"image": str(image_path)}]
    with torch.no_grad():
        logits = model(model.prepare_inputs([prompt], media)).logits
    return logits, model.generate([prompt], media, max_new_tokens=5)


def test_round_trip_with_lora_is_bit_exact(tiny_model, image_files, tmp_path):
    base_logits, _ = outputs(tiny_model, image_files["png"])
    tiny_model.add_lora(r=4, alpha=8, seed=3, zero_b=False)  # random B: the adapter changes the output
    tiny_model.set_routes({"text": [("text", 1.0)]})
    logits, text = outputs(tiny_model, image_files["png"])
    assert not torch.allclose(logits, base_logits)
    tiny_model.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"mcomp_config.json", "projectors.safetensors", "encoders.safetensors", "lora", "base"} <= files
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "m").rglob("*"))
    adapter_cfg = json.loads((tmp_path / "m" / "lora" / "text" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8
    loaded = mcomp.load(tmp_path / "m")
    logits2, text2 = outputs(loaded, image_files["png"])
    assert torch.equal(logits, logits2)
    assert text == text2
    for modality in tiny_model.adapters:
        for (k, v), (k2, v2) in zip(
            tiny_model.adapters[modality].state_dict().items(), loaded.adapters[modality].state_dict().items()
        ):
            assert k == k2 and torch.equal(v, v2)


def test_saved_lora_is_peft_format_peft_itself_loads(tiny_model, tmp_path):
    """Independent check of the LoRA files: peft's own loader gives the same text-only logits."""
    from peft import PeftModel

    tiny_model.add_lora(r=4, alpha=8, seed=5, zero_b=False)
    tiny_model.set_routes({"text": [("text", 1.0)]})
    tiny_model.save_pretrained(tmp_path / "m")
    ids = tiny_model.tokenizer("a red circle on white", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = tiny_model.llm(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "base")
        peft_model = PeftModel.from_pretrained(base, tmp_path / "m" / "lora" / "text")
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_base_is_referenced_by_path_and_checked(tiny_model, image_files, tmp_path):
    base_dir = tmp_path / "base-llm"
    tiny_model.llm.save_pretrained(base_dir)
    tiny_model.tokenizer.save_pretrained(base_dir)
    tiny_model.llm = AutoModelForCausalLM.from_pretrained(base_dir)
    logits, _ = outputs(tiny_model, image_files["png"])
    tiny_model.save_pretrained(tmp_path / "m")
    cfg = ckpt.read_config(tmp_path / "m")
    assert cfg.base_model == str(base_dir.resolve()) and not (tmp_path / "m" / "base").exists()
    assert cfg.base_model_sha256 == ckpt.base_weights_sha256(tiny_model.llm)
    assert torch.equal(outputs(mcomp.load(tmp_path / "m"), image_files["png"])[0], logits)
    # A different base at that path is refused.
    other = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        other.model.norm.weight.add_(1.0)
    other.save_pretrained(base_dir)
    with pytest.raises(ValueError, match="not the one this checkpoint was trained on"):
        mcomp.load(tmp_path / "m")


def test_save_is_atomic_and_refuses_to_overwrite(tiny_model, tmp_path, monkeypatch):
    target = tmp_path / "m"
    tiny_model.save_pretrained(target)
    with pytest.raises(FileExistsError, match="already exists"):
        tiny_model.save_pretrained(target)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "save_tensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_model.save_pretrained(tmp_path / "interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing half-written left behind


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an mcomp model directory"):
        mcomp.load(tmp_path)
    (tmp_path / "mcomp_config.json").write_text(json.dumps({"format": "mcomp-mllm", "bogus": 1}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bogus'\]"):
        mcomp.load(tmp_path)
