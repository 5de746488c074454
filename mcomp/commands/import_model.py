"""`mcomp import`: bring published models and weights into mcomp's formats.

mcomp import modelcompose SRC --out DIR --base VICUNA_DIR [--encoder-root DIR]
mcomp import llava-hf SRC --out DIR --base BASE_DIR [--template chat] [--num-frames N]
mcomp import clip SRC --out FILE.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging

from mcomp.output_record import OutputRecord, add_from_option

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "import",
        help="import released ModelCompose checkpoints, transformers LLaVA models and public encoder weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND", help="what to import (each has its own --help)")
    mc = kinds.add_parser(
        "modelcompose",
        help="a released ModelCompose folder (config.json + adapter_model.bin) -> mcomp model dir",
        description="Convert a folder of HF Adu2021/ModelCompose (NaiveMC or DAMC, any modality, or a released "
        "merged folder) into an mcomp model directory that `mcomp compose`, `mcomp eval` and "
        "mcomp.load use. Flavour, tokens and feature layers come from config.json fields.",
    )
    mc.add_argument("src", help="released checkpoint folder (config.json + adapter_model.bin or mm_projector.bin)")
    mc.add_argument("--out", required=True, help="output mcomp model directory")
    mc.add_argument(
        "--base",
        help="local transformers directory of the base LLM (Vicuna-7B v1.5), tokenizer "
        "included (default: config.json's _name_or_path, by basename under --encoder-root)",
    )
    mc.add_argument(
        "--encoder-root",
        help="directory holding the encoders named in config.json, by basename "
        "(clip-vit-large-patch14-336/, BEATs_iter3_plus_AS2M.pt, "
        "LanguageBind_Video_merge/, point_bert_v1.2.pt)",
    )
    mc.add_argument("--force", action="store_true", help="replace an existing --out")
    add_from_option(mc)
    mc.set_defaults(func=run_modelcompose)

    hf = kinds.add_parser(
        "llava-hf",
        help="a transformers LLaVA, Video-LLaVA or LLaVA-OneVision folder (e.g. llava-hf/llava-1.5-7b-hf) -> "
        "mcomp model dir",
        description="Convert a transformers LLaVA-family folder (LlavaForConditionalGeneration, "
        "VideoLlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration) into an mcomp model whose "
        "LLM is a full fine-tune of --base: the language model as sharded safetensors, the vision tower, the "
        "projector, the folder's image/video processors and tokenizer. The base must have the language model's "
        "architecture, and the language model must be a fine-tune of it (its relative delta is measured and "
        "recorded).",
    )
    hf.add_argument("src", help="the transformers folder (config.json, safetensors weights, processor files)")
    hf.add_argument("--out", required=True, help="output mcomp model directory")
    hf.add_argument("--base", required=True, help="the base LLM's transformers folder (e.g. vicuna-7b-v1.5)")
    hf.add_argument(
        "--max-relative-delta",
        type=float,
        default=0.5,
        help="refuse the base when ‖W_ft − W_base‖ / ‖W_base‖ exceeds this (default 0.5; fine-tunes are far below)",
    )
    hf.add_argument(
        "--template",
        help="conversation template: 'chat' (the folder's own chat template) or a configs/templates name "
        "(default: 'chat' for LLaVA-OneVision, vicuna_v1 for LLaVA-1.5 and Video-LLaVA, as they were trained)",
    )
    hf.add_argument(
        "--num-frames", type=int, default=32, help="frames a LLaVA-OneVision video adapter samples (default 32)"
    )
    hf.add_argument("--force", action="store_true", help="replace an existing --out")
    add_from_option(hf)
    hf.set_defaults(func=run_llava_hf)

    clip = kinds.add_parser(
        "clip",
        help="CLIP vision weights (OpenAI state dict or transformers dir) -> open_clip tower",
        description="Write an open_clip visual-tower safetensors file usable as `checkpoint` of "
        "the image/video adapters; prints the matching tower_config.",
    )
    clip.add_argument("src", help="transformers CLIP directory, or an OpenAI/open_clip state-dict file")
    clip.add_argument("--out", required=True, help="output .safetensors file")
    clip.set_defaults(func=run_clip)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_modelcompose(args: argparse.Namespace) -> int:
    from mcomp.interop.modelcompose import import_modelcompose

    record = OutputRecord.from_args(
        ["import", "modelcompose"],
        args,
        paths=("src", "base", "encoder_root"),
        inputs={"released folder": args.src, "base LLM": args.base, "encoder root": args.encoder_root},
        summary="A released ModelCompose checkpoint converted to an mcomp model.",
    )
    model = import_modelcompose(
        args.src, args.out, base=args.base, encoder_root=args.encoder_root, overwrite=args.force, record=record
    )
    info = model.provenance["import"]
    print(
        f"imported {args.src} ({info['flavour']}, lora_strategy={info['lora_strategy']}) as "
        f"{', '.join(model.modalities)}; LoRA {list(info['lora_adapters'].values()) or 'none'}; saved {args.out}"
    )
    return 0


def run_llava_hf(args: argparse.Namespace) -> int:
    from mcomp.checkpoint import read_config
    from mcomp.interop.llava_hf import import_llava_hf

    out = import_llava_hf(
        args.src,
        args.out,
        base=args.base,
        max_relative_delta=args.max_relative_delta,
        template=args.template,
        num_frames=args.num_frames,
        overwrite=args.force,
        record=OutputRecord.from_args(
            ["import", "llava-hf"],
            args,
            paths=("src", "base"),
            inputs={"transformers folder": args.src, "base LLM": args.base},
            summary="A transformers LLaVA-family model converted to an mcomp model (its LLM a full fine-tune).",
        ),
    )
    info = read_config(out).provenance["import"]
    print(
        f"imported {args.src} ({info['architecture']}; relative delta to the base {info['relative_delta']:.4f}; "
        f"vocabulary rows dropped: {info['vocabulary_rows_dropped']}); saved {args.out}"
    )
    return 0


def run_clip(args: argparse.Namespace) -> int:
    from mcomp.interop.clip_weights import write_open_clip_tower

    cfg = write_open_clip_tower(args.src, args.out)
    print(json.dumps({"checkpoint": args.out, "tower_config": cfg}, indent=2))
    return 0
