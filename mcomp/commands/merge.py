"""`mcomp merge`: merge checkpoints (or LoRA adapters) described by a mergekit-style YAML."""

from __future__ import annotations

import argparse
import logging

from mcomp.output_record import OutputRecord, add_from_option

logger = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tuned checkpoints or LoRA adapters (task arithmetic, TIES, DARE, PCB)",
        description="Merge models that share a base, streaming safetensors from disk. The YAML is mergekit's "
        "(merge_method, base_model, models or slices, parameters with gradients and filters, dtype, out_dtype, "
        "tokenizer_source, model+lora): a config in mergekit's vocabulary is merged as mergekit merges it; one "
        "naming mcomp's own parameters (scope, sign, seed, scale, ...) or methods gets mcomp's. "
        "See docs/merging_with_mergekit_yaml.md.",
    )
    p.add_argument("config", help="merge YAML")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the per-chunk maths runs (default cpu, where the elementwise methods run fused native kernels "
        "on the stored values; on the GPU machines measured so far the CPU was the faster for them). cuda: chunks "
        "8x larger, the next read into pinned memory and sent on a side stream while the current one is "
        "computed; expected to pay for the SVD methods (tsv, iso_c, iso_cts, knots): measure with "
        "scripts/bench_merge.py --device cuda",
    )
    p.add_argument(
        "--dtype",
        help="output dtype (float16, bfloat16, float32); overrides the YAML's (mergekit's reading: its out_dtype); "
        "default: the YAML's, else the base's",
    )
    p.add_argument("--chunk-size", type=int, default=None, help="coordinates per chunk (memory vs overhead)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_from_option(p)
    p.set_defaults(func=run)


def engine_options(args: argparse.Namespace) -> dict:
    """The command's options both readings pass to the merge."""
    return {
        "force": args.force,
        "device": args.device,
        "chunk_elems": args.chunk_size,
        "max_shard_size": args.max_shard_size,
        "progress": not args.no_progress,
    }


def _record(args: argparse.Namespace, cfg) -> OutputRecord:
    """The output's recipe (the config inlined, its paths absolute) and card; a 'model+lora' input is
    checksummed as its two parts."""
    from mcomp.merge.mergekit_schema import ModelRef

    def parts(label: str, text: str) -> dict[str, str]:
        ref = ModelRef.parse(text, f"{cfg.source}: {label}")
        return {label: ref.model, **({f"{label} LoRA": ref.lora} if ref.lora else {})}

    models = list(dict.fromkeys(cfg.model_paths()))  # a model in several slices is one input
    inputs = parts("base", cfg.base_model) if cfg.base_model else {}
    for i, text in enumerate(models):
        inputs.update(parts(f"model {i + 1}", text))
    return OutputRecord.from_args(
        ["merge"],
        args,
        inlined={"config": cfg.to_dict()},
        inputs=inputs,
        summary=f"A {cfg.merge_method} merge ({cfg.reading()}'s reading) of {len(models)} model input(s).",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from mcomp.merge import merge_checkpoints
    from mcomp.merge.config import MERGEKIT, MergeConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    if isinstance(args.config, dict):  # from a recipe: the config itself
        cfg = MergeConfig.from_mapping(args.config, f"{args.from_recipe}: config")
    else:
        cfg = MergeConfig.from_yaml(args.config)
    cfg = cfg.with_absolute_paths()  # the recipe and card name the inputs wherever they are read from
    record = _record(args, cfg)
    if cfg.reading() == MERGEKIT:
        from mcomp.merge.plan_merge import merge_config

        report = merge_config(cfg, args.out, dtype=args.dtype, record=record, **engine_options(args))
        print(
            f"merged {len(cfg.model_paths())} model input(s) with {report.method} (mergekit's reading) -> {args.out} "
            f"({report.seconds:.1f} s)"
        )
        return 0
    models = [e.model for e in cfg.resolved_models()]
    report = merge_checkpoints(
        cfg.base_model,
        models,
        args.out,
        cfg.merge_method,
        dtype=args.dtype or cfg.dtype,
        lora_rank=cfg.lora_rank,
        record=record,
        **engine_options(args),
        **cfg.method_params(),
    )
    print(
        f"merged {len(models)} model(s) onto {cfg.base_model} with {report.method} -> {args.out} "
        f"({report.passes} pass(es), {report.seconds:.1f} s)"
    )
    for stats in report.stats:
        if "lora_reconstruction" in stats:
            errs = stats["lora_reconstruction"]
            worst = max(errs.values()) if errs else 0.0
            print(
                f"LoRA re-factorised to rank {cfg.lora_rank}: relative reconstruction error "
                f"{stats['lora_total_error']:.4g} overall, max {worst:.4g} over {len(errs)} weight(s)"
            )
    return 0
