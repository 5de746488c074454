"""`mcomp train`: train a single-modality MLLM (stage 1: projector; stage 2: LoRA + projector)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from mcomp.output_record import OutputRecord, add_from_option

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a single-modality MLLM on LLaVA-style conversation data",
        description="Stage 1 trains the projector with the LLM frozen; stage 2 adds LoRA. --decoupled trains "
        "DAMC-style separate text and modality LoRA plus prefix/suffix tokens. Runs on accelerate "
        "(`accelerate launch -m mcomp train ...` for several GPUs); resumes from --checkpoint-dir.",
    )
    init = p.add_mutually_exclusive_group(required=True)
    init.add_argument("--init", help="a saved mcomp model to continue from (e.g. the stage-1 output)")
    init.add_argument("--base", help="a transformers causal-LM directory, or 'tiny' for the built-in tiny Llama")
    p.add_argument(
        "--adapter",
        default="image",
        help="with --base: an adapter type (published defaults) or tiny:<type> for the tiny shapes",
    )
    p.add_argument("--adapter-config", help="with --base: a JSON file with the adapter config (overrides --adapter)")
    p.add_argument("--data", required=True, help="training JSON ([{id, conversations, modal_inputs}])")
    p.add_argument("--data-root", help="folder media paths are relative to (default: the JSON's folder)")
    p.add_argument("--out", required=True, help="output model directory (must not exist unless --force)")
    p.add_argument(
        "--checkpoint-dir",
        help="resumable checkpoints (default: <out>.checkpoints); a run resumes "
        "from them only if they record the same run (data, start model, config)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start afresh: clear the checkpoint folder (only one of mcomp checkpoints) and replace --out",
    )
    p.add_argument(
        "--allow-media-outside-root",
        action="store_true",
        help="train on media files that resolve outside the data root (by '..' or a symlink)",
    )
    p.add_argument(
        "--recipe",
        help="published hyper-parameters to start from (configs/recipes/<name>.yaml, e.g. "
        "modelcompose), chosen by the model's modality, --stage and --decoupled; "
        "--config and the flags below override them",
    )
    p.add_argument("--config", help="a JSON file with TrainConfig fields; flags below override it")
    p.add_argument(
        "--stage",
        type=int,
        choices=(1, 2),
        help=f"1: the projector alone (alignment); 2: the projector and a LoRA (instruction tuning) (default: "
        f"{_default('stage')})",
    )
    p.add_argument("--decoupled", action="store_true", default=None, help="DAMC: separate text/modality LoRA")
    p.add_argument(
        "--template",
        default="vicuna_v1",
        help="with --base: the conversation template, vicuna_v1 (the published models') or chat (the base "
        "tokenizer's own chat template, e.g. Qwen's, Llama-3's, Gemma's); --init keeps the model's",
    )
    p.add_argument(
        "--full",
        action="store_true",
        default=None,
        help="stage 2 fine-tunes the whole LLM instead of a LoRA (saved as sharded safetensors; the base "
        "folder it starts from stays its reference)",
    )
    for name, typ, what in (
        ("lora-r", int, "LoRA rank"),
        ("lora-alpha", float, "LoRA alpha (the update is scaled by alpha / r)"),
        ("learning-rate", float, "peak learning rate (AdamW)"),
        ("epochs", int, "passes over the data"),
        ("max-steps", int, "optimizer steps; > 0 overrides --epochs"),
        ("batch-size", int, "samples per step and process"),
        ("grad-accum", int, "micro-batches per optimizer step"),
        ("seed", int, "seed of every random step: init, shuffling, dropout"),
        ("save-every", int, "optimizer steps between resumable checkpoints (0: only at the end)"),
        ("prefix-tokens", int, "with --decoupled: learned tokens before each modality input"),
        ("suffix-tokens", int, "with --decoupled: learned tokens after each modality input"),
        ("warmup-steps", int, "linear warmup steps"),
        ("warmup-ratio", float, "without --warmup-steps: warmup as this share of the steps, as transformers' Trainer"),
        ("projector-lr", float, "the projector's learning rate (unset: --learning-rate; 0 freezes it)"),
        ("global-batch-size", int, "> 0: --grad-accum set to reach this many samples a step over all processes"),
    ):
        field = name.replace("-", "_")
        default = _default(field)
        p.add_argument(f"--{name}", type=typ, help=what if default is None else f"{what} (default: {default})")
    p.add_argument("--lr-scheduler", choices=("constant", "cosine"), help="after warmup (default: constant)")
    add_from_option(p)
    p.set_defaults(func=run)


# the flags that set TrainConfig fields (the recipe holds them resolved, as `config`)
CONFIG_FLAGS = (
    "stage",
    "decoupled",
    "full",
    "lora_r",
    "lora_alpha",
    "learning_rate",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "seed",
    "save_every",
    "prefix_tokens",
    "suffix_tokens",
    "warmup_steps",
    "lr_scheduler",
    "warmup_ratio",
    "projector_lr",
    "global_batch_size",
)


def _mapping(value, what: str) -> dict:
    """A JSON file's object, or the mapping a recipe holds in its place."""
    if isinstance(value, dict):
        return dict(value)
    from mcomp.resources import read_document

    return read_document(value, what, dict)


def _default(field: str):
    """TrainConfig's default of `field` (the flags' help names it; the dataclass holds it)."""
    import dataclasses

    from mcomp.train import TrainConfig

    (f,) = [f for f in dataclasses.fields(TrainConfig) if f.name == field]
    return f.default


def build_start_model(args):
    """The model to train and the identity of where it starts (for the checkpoints' run identity):
    --init: a digest of the model folder (its mcomp_config.json holds the base LLM's checksum, checked
    on load); --base: the base LLM's weights checksum, its tokenizer files and the adapter configs."""
    import mcomp
    from mcomp import tiny
    from mcomp.checkpoint import base_weights_sha256, tokenizer_sha256
    from mcomp.fingerprint import directory_digest
    from mcomp.model import MultimodalLM

    if args.init:
        return mcomp.load(args.init), {"init_digest": directory_digest(args.init)}
    if args.adapter_config:
        adapter_cfg = _mapping(args.adapter_config, "--adapter-config")
    elif args.adapter.startswith("tiny:"):
        kind = args.adapter.split(":", 1)[1]
        factory = getattr(tiny, f"tiny_{kind}_adapter_config", None)
        if factory is None:
            raise ValueError(f"--adapter {args.adapter}: no tiny config for {kind!r}")
        adapter_cfg = factory()
    else:
        adapter_cfg = {"adapter": args.adapter}
    if args.base == "tiny":
        tokenizer = tiny.build_tokenizer()
        llm = tiny.build_llm(tokenizer, seed=0)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.base, trust_remote_code=False)
        llm = AutoModelForCausalLM.from_pretrained(args.base, trust_remote_code=False)
    model = MultimodalLM.build(llm, tokenizer, [adapter_cfg], template=args.template)
    start = {
        "base_sha256": base_weights_sha256(llm),
        "tokenizer_sha256": None if args.base == "tiny" else tokenizer_sha256(args.base),
        "adapters": [a.config.to_dict() for a in model.adapters.values()],
    }
    return model, start


def run(args: argparse.Namespace) -> int:
    from mcomp.data import TrainingDataError, load_conversation_data
    from mcomp.io import check_apart, sha256_file
    from mcomp.train import TrainConfig, train

    fields = _mapping(args.config, "--config") if args.config else {}
    if args.adapter_config:  # read once: the recipe holds what training used
        args.adapter_config = _mapping(args.adapter_config, "--adapter-config")
    for key in CONFIG_FLAGS:
        value = getattr(args, key)
        if value is not None:
            fields[key] = value
    out = Path(args.out)
    checkpoints = Path(args.checkpoint_dir or f"{out}.checkpoints")
    # what --force must never delete: checked now, not after hours of training
    inputs = [args.init, None if args.base in (None, "tiny") else args.base, args.data]
    check_apart(out, inputs)
    check_apart(checkpoints, inputs)
    try:
        check_apart(checkpoints, [out])
    except ValueError:
        raise ValueError(
            f"--checkpoint-dir {checkpoints} and --out {out} must lie apart (neither in the other): "
            f"saving the model replaces --out, and --force clears the checkpoint folder"
        ) from None
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    samples = load_conversation_data(args.data, args.data_root)
    data_sha256 = sha256_file(args.data)
    model, start = build_start_model(args)
    source = args.config if isinstance(args.config, str) else "command line"
    if args.recipe:
        from mcomp.recipes import recipe_fields

        defaults = TrainConfig()
        stage, decoupled = fields.get("stage", defaults.stage), fields.get("decoupled", defaults.decoupled)
        modality = model.modalities[0] if len(model.modalities) == 1 else None
        if modality is None:
            raise ValueError(f"--recipe: a modality MLLM has one modality, this model has {model.modalities}")
        fields = {**recipe_fields(args.recipe, modality, stage, decoupled), **fields}
        source = f"recipe {args.recipe} + {source}"
    cfg = TrainConfig.from_dict(fields, source=source)
    logger.info("training config: %s", json.dumps(cfg.to_dict(), sort_keys=True))
    identity = {
        "data_sha256": data_sha256,
        "data_root": str(Path(args.data_root if args.data_root is not None else Path(args.data).parent).resolve()),
        "start_model": start,
    }
    try:
        summary = train(
            model,
            samples,
            cfg,
            checkpoints,
            identity=identity,
            restart=args.force,
            allow_media_outside_root=args.allow_media_outside_root,
        )
    except TrainingDataError as err:  # the message names samples and files; say which data they are from
        raise TrainingDataError(f"{args.data}: {err}") from err
    history = list(model.provenance.get("training", []))
    history.append(
        {
            "config": cfg.to_dict(),
            "data": str(Path(args.data).resolve()),
            "data_sha256": data_sha256,
            "steps": summary["steps"],
            "final_loss": summary["final_loss"],
        }
    )
    model.provenance = {**model.provenance, "training": history}
    record = OutputRecord.from_args(
        ["train"],
        args,
        paths=("init", "base", "data", "data_root"),
        inlined={
            "config": cfg.to_dict(),
            "recipe": None,
            "adapter_config": args.adapter_config or None,  # the mapping read at the start
            **{key: None for key in CONFIG_FLAGS},
        },
        inputs={
            "start model": args.init,
            "base LLM": None if args.base in (None, "tiny") else args.base,
            "data": args.data,
        },
        summary=f"A stage-{cfg.stage} {'DAMC ' if cfg.decoupled else ''}training run of a "
        f"{', '.join(model.modalities)} MLLM.",
    )
    record.facts.update({"optimizer steps": summary["steps"], "final loss": summary["final_loss"]})
    model.save_pretrained(out, overwrite=args.force, inputs=inputs, record=record)
    done = summary["steps"] - summary["resumed_from"]
    resumed = (
        f" ({done} in this run, resumed from step {summary['resumed_from']} in {checkpoints})"
        if summary["resumed_from"]
        else ""
    )
    loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    print(f"trained {summary['steps']} steps{resumed}, final loss {loss}; saved {out}")
    return 0
