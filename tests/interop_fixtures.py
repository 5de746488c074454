"""Tiny stand-ins for the published files, with the released key names and file formats (tiny shapes).

base/                                   "Vicuna": tiny Llama + tokenizer (save_pretrained)
encoders/clip-vit-large-patch14-336/    transformers CLIPModel directory (vision_model.*, text_model.*)
encoders/BEATs_iter3_plus_AS2M.pt       {"cfg": upstream BEATsConfig fields, "model": state dict}
encoders/LanguageBind_Video_merge/      config.json (vision_config) + model.safetensors (vision_model.*, text)
encoders/point_bert_v1.2.pt             plain Point-BERT state dict
released/multimodal-vicuna-7b-v1.5-<m>-<flavour>/   config.json + adapter_model.bin (bf16 torch.save)
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from mcomp.lora import LLAMA_TARGETS

HIDDEN, LAYERS, INTER = 64, 2, 128  # tiny-llama
R, ALPHA = 4, 8.0
CLUSTER = "/mnt/cluster/ckpts"  # where the released configs point (absent here)
CLIP_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
    projection_dim=48,
)
LB_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    add_time_attn=True,
    num_frames=8,
)
BEATS_CFG = {
    "input_patch_size": 16,
    "embed_dim": 16,
    "conv_bias": False,
    "encoder_layers": 2,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 4,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "deep_norm": True,
    "conv_pos": 16,
    "conv_pos_groups": 4,
    "relative_position_embedding": True,
    "num_buckets": 32,
    "max_distance": 64,
    "gru_rel_pos": True,
    # training-only fields as in the upstream cfg
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "encoder_layerdrop": 0.05,
    "dropout_input": 0.0,
    "layer_wise_gradient_decay_ratio": 0.6,
    "finetuned_model": False,
}
POINT_WIDTH = 64
ENCODER_DIMS = {
    "vision": CLIP_VISION["hidden_size"],
    "audio": BEATS_CFG["encoder_embed_dim"],
    "video": LB_VISION["hidden_size"],
    "point": POINT_WIDTH,
}


def write_base(root: Path) -> Path:
    from mcomp.tiny import build_llm, build_tokenizer

    tok = build_tokenizer()
    llm = build_llm(tok, seed=0)
    base = root / "vicuna-7b-v1.5"
    llm.save_pretrained(base)
    tok.save_pretrained(base)
    return base


def write_clip_hf(path: Path, seed: int = 1, full: bool = True) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    if full:
        cfg = CLIPConfig(
            vision_config=CLIP_VISION,
            projection_dim=CLIP_VISION["projection_dim"],
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=99,
                max_position_embeddings=16,
            ),
        )
        model = CLIPModel(cfg)
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION))
    model.save_pretrained(path)
    return path


def languagebind_state(seed: int = 2) -> dict[str, torch.Tensor]:
    from mcomp.encoders.languagebind import LanguageBindVideoTower

    torch.manual_seed(seed)
    tower = LanguageBindVideoTower(LB_VISION)
    state = {f"vision_model.{k}": v.clone() for k, v in tower.vision_model.state_dict().items()}
    state["text_model.embeddings.token_embedding.weight"] = torch.randn(99, 32)
    state["visual_projection.weight"] = torch.randn(48, 64)
    state["logit_scale"] = torch.tensor(2.0)
    return state


def write_languagebind(path: Path, seed: int = 2) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    cfg = {
        "model_type": "LanguageBindVideo",
        "projection_dim": 48,
        "vision_config": {**LB_VISION, "force_patch_dropout": 0.3, "lora_r": 16, "video_decode_backend": "decord"},
        "text_config": {"hidden_size": 32},
    }
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(languagebind_state(seed), str(path / "model.safetensors"))
    return path


def beats_state(seed: int = 3) -> dict[str, torch.Tensor]:
    from mcomp.encoders.beats import BEATs, BEATsConfig

    torch.manual_seed(seed)
    cfg = BEATsConfig.from_checkpoint_cfg(BEATS_CFG)
    return {k: v.clone() for k, v in BEATs(cfg).state_dict().items()}


def write_beats(path: Path, seed: int = 3) -> Path:
    torch.save({"cfg": dict(BEATS_CFG), "model": beats_state(seed)}, path)
    return path


def point_state(seed: int = 4) -> dict[str, torch.Tensor]:
    from mcomp.encoders.pointbert import PointBert, PointBertConfig

    torch.manual_seed(seed)
    enc = PointBert(PointBertConfig(trans_dim=POINT_WIDTH, depth=2, num_heads=1, encoder_dims=32))
    return {k: v.clone() for k, v in enc.state_dict().items()}


def write_point_bert(path: Path, seed: int = 4) -> Path:
    torch.save(point_state(seed), path)
    return path


def write_encoders(root: Path) -> Path:
    enc = root / "encoders"
    enc.mkdir()
    write_clip_hf(enc / "clip-vit-large-patch14-336")
    write_beats(enc / "BEATs_iter3_plus_AS2M.pt")
    write_languagebind(enc / "LanguageBind_Video_merge")
    write_point_bert(enc / "point_bert_v1.2.pt")
    return enc


# --- released folders -----------------------------------------------------------------------------
def released_config(modality: str, strategy: str, tokens: int, vocab: int) -> dict:
    cfg = {
        "model_type": "multimodal",
        "architectures": ["MultimodalLlamaForCausalLM"],
        "_name_or_path": f"{CLUSTER}/vicuna-7b-v1.5",
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "intermediate_size": INTER,
        "num_attention_heads": 4,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
        "lora_strategy": strategy,
        "lora_r": R,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.05,
        "local_prefix_tokens": tokens,
        "local_suffix_tokens": tokens,
        "mm_vision_encoder": None,
        "mm_vision_tower": None,
        "mm_audio_encoder": None,
        "mm_video_encoder": None,
        "mm_point_encoder": None,
        "reset_scaling_weights": None,
        "merge_default_weights": None,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "seperate_layernorm": False,
        "layer_local_tokens": False,
    }
    if modality == "vision":
        path = f"{CLUSTER}/openai/clip-vit-large-patch14-336"
        cfg.update(
            mm_vision_encoder=path,
            mm_vision_tower=path,
            mm_hidden_size=ENCODER_DIMS["vision"],
            mm_projector_type="mlp2x_gelu",
            mm_vision_select_layer=-2,
            mm_vision_select_feature="patch",
            image_aspect_ratio="pad",
        )
    elif modality == "audio":
        cfg.update(
            mm_audio_encoder=f"{CLUSTER}/beats/BEATs_iter3_plus_AS2M.pt",
            image_aspect_ratio="square",
            mm_audio_hidden_size=ENCODER_DIMS["audio"],
            mm_audio_projector_type="qformer_32N_2L",
        )
    elif modality == "video":
        cfg.update(
            mm_video_encoder=f"{CLUSTER}/LanguageBind/LanguageBind_Video_merge",
            image_aspect_ratio="pad",
            mm_video_hidden_size=ENCODER_DIMS["video"],
            mm_video_projector_type="mlp2x_gelu",
            mm_video_select_layer=-2,
            mm_video_select_feature="patch",
        )
    else:
        cfg.update(
            mm_point_encoder=f"{CLUSTER}/point_bert_v1.2.pt",
            image_aspect_ratio="square",
            mm_point_hidden_size=ENCODER_DIMS["point"],
            mm_point_projector_type="mlp2x_gelu",
        )
    return cfg


def projector_state(modality: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if modality == "audio":
        from mcomp.encoders.qformer import QFormerConfig, QFormerProjector

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            proj = QFormerProjector(
                QFormerConfig(
                    num_queries=32,
                    num_layers=2,
                    hidden_size=64,
                    num_heads=1,
                    intermediate_size=128,
                    encoder_width=ENCODER_DIMS["audio"],
                    max_positions=1024,
                ),
                HIDDEN,
            )
        return {k: v.clone() for k, v in proj.state_dict().items()}
    d = ENCODER_DIMS[modality]
    return {
        "0.weight": torch.randn(HIDDEN, d, generator=gen) * d**-0.5,
        "0.bias": torch.randn(HIDDEN, generator=gen) * 0.1,
        "2.weight": torch.randn(HIDDEN, HIDDEN, generator=gen) * HIDDEN**-0.5,
        "2.bias": torch.randn(HIDDEN, generator=gen) * 0.1,
    }


def lora_state(adapter: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    dims = {
        "q_proj": (HIDDEN, HIDDEN),
        "k_proj": (HIDDEN, HIDDEN),
        "v_proj": (HIDDEN, HIDDEN),
        "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (HIDDEN, INTER),
        "up_proj": (HIDDEN, INTER),
        "down_proj": (INTER, HIDDEN),
    }
    out = {}
    for layer in range(LAYERS):
        for target in LLAMA_TARGETS:
            block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            d_in, d_out = dims[target]
            key = f"model.layers.{layer}.{block}.{target}"
            out[f"{key}.lora_A.{adapter}.weight"] = torch.randn(R, d_in, generator=gen) * d_in**-0.5
            out[f"{key}.lora_B.{adapter}.weight"] = torch.randn(d_out, R, generator=gen) * 0.3
    return out


def released_state(modality: str, damc: bool, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """All trainable tensors as the released trainer saves them (bf16, module names)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    state.update(lora_state("default", gen))
    if damc:
        state.update(lora_state(modality, gen))
    state.update({f"model.modal_projectors.{modality}.{k}": v for k, v in projector_state(modality, gen).items()})
    if damc:
        for kind in ("prefix", "suffix"):
            for name in ("default", modality):  # the unused `default` tokens are saved too (spec §1.3)
                state[f"{kind}_tokens.{name}"] = torch.randn(1, 5, HIDDEN, generator=gen) * 0.5
    return OrderedDict((k, v.to(torch.bfloat16)) for k, v in state.items())


def write_released(
    root: Path,
    modality: str,
    flavour: str,
    vocab: int,
    seed: int,
    *,
    strategy: str | None = None,
    folder_flavour: str | None = None,
) -> Path:
    """A released folder; `strategy` overrides the config (e.g. a `-damc` folder trained with `same`)."""
    damc = flavour == "damc"
    strategy = strategy or ("modal+language" if damc else "same")
    path = root / f"multimodal-vicuna-7b-v1.5-{modality}-{folder_flavour or flavour}"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(released_config(modality, strategy, 5 if damc else 0, vocab)))
    torch.save(released_state(modality, damc, seed), path / "adapter_model.bin")
    return path


def merge_released(folders: list[Path], out: Path, reset: str) -> Path:
    """`merge_unimodal_modelcompose.py --strategy online-merge-reset-<reset>` (spec §3.1-3.2)."""
    from mcomp.interop.modelcompose import infer_modals

    states, cfgs = [], []
    for f in folders:
        states.append(torch.load(f / "adapter_model.bin", weights_only=True))
        cfgs.append(json.loads((f / "config.json").read_text()))
    counts: dict[str, int] = {}
    for s in states:
        for k in s:
            counts[k] = counts.get(k, 0) + 1
    merged = OrderedDict()
    for s, c in zip(states, cfgs):
        modal = infer_modals(c)[0]
        for k, v in s.items():
            merged[k.replace("default", f"default-{modal}") if counts[k] > 1 else k] = v
    cfg: dict = {}
    for c in cfgs:
        for k, v in c.items():
            cfg[k] = cfg.get(k) or v
    cfg["reset_scaling_weights"] = reset
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg))
    torch.save(merged, out / "adapter_model.bin")
    return out
