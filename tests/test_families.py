"""Base LLMs of several families (transformers' own config classes, tiny, random init): LoRA lands on
the family's projections (configs/llm/families.yaml; Phi-3's fused ones included), training, saving,
loading and composition (NaiveMC, DAMC) work with each, tied embeddings included."""

from __future__ import annotations

import pytest
import torch
import transformers

import mcomp
from mcomp.compose import compose
from mcomp.lora import FAMILIES, routed_layers
from tests.composition_fixtures import write_audio_data, write_image_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
# family -> (config class, model class, extra config fields)
FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),  # tied embeddings
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv_proj and gate_up_proj
}


def tiny_llm(family: str, vocab: int, pad: int):
    config_class, model_class, extra = FAMILY_CLASSES[family]
    config = getattr(transformers, config_class)(vocab_size=vocab, pad_token_id=pad, **SHAPE, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mcomp.data import load_conversation_data

    root = tmp_path_factory.mktemp("family-data")
    return {
        "image": load_conversation_data(write_image_data(root)),
        "audio": load_conversation_data(write_audio_data(root)),
        "media": {"image": str(root / "img0.png"), "audio": str(root / "aud1.wav")},
    }


def test_every_family_in_the_table_is_tested():
    assert set(FAMILY_CLASSES) <= set(FAMILIES) and {"llama", "qwen2", "phi3"} <= set(FAMILY_CLASSES)


@pytest.mark.parametrize("family", sorted(FAMILY_CLASSES))
def test_a_family_trains_saves_loads_and_composes(family, data, tmp_path):
    from mcomp.model import MultimodalLM
    from mcomp.tiny import build_tokenizer, tiny_audio_adapter_config, tiny_image_adapter_config
    from mcomp.train import TrainConfig, train

    tokenizer = build_tokenizer()
    adapters = {"image": tiny_image_adapter_config(), "audio": tiny_audio_adapter_config()}
    targets = set(FAMILIES[family]["lora_targets"])
    paths = {}
    for modality, decoupled in (("image", False), ("audio", True)):
        llm = tiny_llm(family, len(tokenizer), tokenizer.pad_token_id)
        linear = {n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, torch.nn.Linear)}
        model = MultimodalLM.build(llm, tokenizer, [adapters[modality]])
        cfg = TrainConfig(
            stage=2, decoupled=decoupled, lora_r=4, lora_alpha=8, learning_rate=1e-2, max_steps=2, batch_size=3
        )
        train(model, data[modality], cfg, tmp_path / f"ckpt-{modality}")
        routed = {p.rsplit(".", 1)[-1] for p in routed_layers(model.llm)}
        assert routed == targets and targets <= linear  # every projection of the family, nothing else
        assert len(routed_layers(model.llm)) == len(targets) * SHAPE["num_hidden_layers"]
        model.save_pretrained(tmp_path / modality)
        paths[modality] = tmp_path / modality
        loaded = mcomp.load(tmp_path / modality)
        prompt = model.template.prompt(f"{modality}: {model.adapters[modality].placeholder}\nWhat is it?")
        media = {modality: data["media"][modality]}
        with torch.no_grad():
            want = model(model.prepare_inputs([prompt], [media])).logits
            got = loaded(loaded.prepare_inputs([prompt], [media])).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for method, merge in (("naivemc", "linear"), ("naivemc", "ties"), ("damc", "linear")):
        composed = compose(paths, method=method, merge=merge, convert=True)
        prompt = composed.template.prompt("image: <image>\naudio: <audio>\nWhat do they share?")
        scores = composed.loglikelihood(prompt, [" red", " high"], data["media"])
        assert all(torch.isfinite(torch.tensor(s.logprob)) for s in scores), (method, merge)


def test_llama_targets_on_phi3_are_refused_naming_the_unmatched_modules():
    from mcomp.lora import LLAMA_TARGETS, LoraSpec
    from mcomp.model import MultimodalLM
    from mcomp.tiny import build_tokenizer, tiny_image_adapter_config

    tokenizer = build_tokenizer()
    model = MultimodalLM.build(
        tiny_llm("phi3", len(tokenizer), tokenizer.pad_token_id), tokenizer, [tiny_image_adapter_config()]
    )
    with pytest.raises(
        ValueError, match=r"\['gate_proj', 'k_proj', 'q_proj', 'up_proj', 'v_proj'\] match no linear layer"
    ):
        model.add_lora(LoraSpec(target_modules=list(LLAMA_TARGETS)))


def test_the_zoo_builds_and_composes_on_a_qwen2_base(tmp_path):
    """The embedded zoo on a second architecture (configs/llm/tiny-qwen2.json), reduced to two
    modalities: its base is a Qwen2ForCausalLM, and its models compose."""
    import json

    from mcomp.zoo import build_zoo

    zoo = build_zoo("test", 0, tmp_path / "zoo", workers=2, modalities=["image", "audio"], llm_shape="tiny-qwen2")
    assert json.loads((zoo.base / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert zoo.manifest["settings"]["llm_shape"] == "tiny-qwen2"
    composed = compose({m: zoo.model(m, "naivemc", 0) for m in ("image", "audio")}, method="naivemc", merge="ties")
    assert type(composed.llm).__name__ == "Qwen2ForCausalLM"
    question = json.loads(zoo.world.val_json("image").read_text())[0]
    media = {"image": str(zoo.world.val_json("image").parent / question["modal_inputs"]["vision"][0])}
    prompt = composed.template.prompt(question["conversations"][0]["value"])
    assert all(torch.isfinite(torch.tensor(s.logprob)) for s in composed.loglikelihood(prompt, [" a red cube"], media))
