"""Tiny models built locally (no download): a Llama with a locally trained tokenizer, and a tiny
open_clip ViT. Same architectures and key names as the real ones; shapes in `configs/`."""

from __future__ import annotations

import string
from typing import Iterable

import torch

from mcomp.conversation import get_template
from mcomp.resources import load_config

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def default_corpus() -> list[str]:
    """Text for the tiny tokenizer: the template text plus the shipped word list."""
    template = get_template("vicuna_v1")
    words = load_config("tiny", "corpus.yaml")["sentences"]
    return [template.prompt("What is shown in the image?")] + list(words)


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512):
    """A Llama-like BPE tokenizer (SentencePiece-style "▁" word prefix, newlines apart, BOS added), trained here.

    Every printable ASCII character is in the base alphabet, so no input maps to <unk>.
    Training is deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # A newline is a token of its own, as in Llama's tokenizer: fused into words ("cone\nB."), an
    # option's text in a question would not be the tokens of the same text as an answer.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = sorted(set(string.printable) | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        padding_side="left",
    )


def build_llm(tokenizer, shape: str = "tiny-llama", seed: int = 0, **overrides):
    """A randomly initialised causal LM with a shipped shape (`configs/llm/<shape>.json`), of the
    architecture it names (a transformers class: LlamaForCausalLM, Qwen2ForCausalLM, ...)."""
    import transformers

    cfg = dict(load_config("llm", f"{shape}.json"))
    (architecture,) = cfg.pop("architectures", ["LlamaForCausalLM"])
    model_class = getattr(transformers, architecture, None)
    if model_class is None or not architecture.endswith("ForCausalLM"):
        raise ValueError(f"configs/llm/{shape}.json: {architecture!r} is not a transformers causal-LM class")
    cfg.update(overrides)
    config = model_class.config_class(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def tiny_image_adapter_config(**overrides):
    """A tiny open_clip ViT (`configs/encoders/tiny-vit.json`, 32 px, 16 patches; the video adapter's
    tower too). It has 3 blocks and the adapter reads the penultimate one, as LLaVA reads CLIP, so 2
    blocks run: with 2 blocks only the first ran, and the zoo's image encoder fitted 93% of its
    pretraining shapes (3 blocks: 99.6%)."""
    from mcomp.encoders.image import ImageAdapterConfig

    fields = {"tower": "tiny-vit", "tower_config": load_config("encoders", "tiny-vit.json")}
    fields.update(overrides)
    return ImageAdapterConfig(**fields)


def tiny_video_adapter_config(**overrides):
    from mcomp.encoders.video import VideoAdapterConfig

    fields = {"tower": "tiny-vit", "tower_config": load_config("encoders", "tiny-vit.json")}
    fields.update(overrides)
    return VideoAdapterConfig(**fields)


def tiny_point_adapter_config(**overrides):
    from mcomp.encoders.point import PointAdapterConfig

    fields = {"encoder": load_config("encoders", "tiny-pointbert.json"), "num_points": 256}
    fields.update(overrides)
    return PointAdapterConfig(**fields)


def tiny_audio_adapter_config(**overrides):
    """A small BEATs + Q-Former: encoder shape in `configs/encoders/tiny-beats.json`, front-end length
    and Q-Former shape in `configs/encoders/tiny-audio.json`."""
    from mcomp.encoders.audio import AudioAdapterConfig

    fields = {
        "encoder_config": load_config("encoders", "tiny-beats.json"),
        **load_config("encoders", "tiny-audio.json"),
    }
    fields.update(overrides)
    return AudioAdapterConfig(**fields)


def build_tiny_mllm(adapter_configs=None, seed: int = 0, llm_shape: str = "tiny-llama"):
    """A tiny MultimodalLM (image adapter by default), everything randomly initialised from `seed`."""
    from mcomp.model import MultimodalLM

    tokenizer = build_tokenizer()
    llm = build_llm(tokenizer, llm_shape, seed=seed)
    configs = adapter_configs if adapter_configs is not None else [tiny_image_adapter_config()]
    return MultimodalLM.build(llm, tokenizer, configs, seed=seed + 1)
