"""`mcomp eval`: evaluate a model on an MCUB-family task (MCUB-4, MCUB-3, AVQA, MUSIC-AVQA, ModelNet40).

    mcomp eval --model DIR --task mcub4 --data-root DIR --mode generate --out RUN_DIR
    accelerate launch -m mcomp eval ...      # samples sharded over processes, gathered on the main one

Re-running the same command on the same --out resumes an interrupted run; a run of anything else
(another model content, data, task or settings) is refused there, and --force starts it afresh.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="directory of a saved mcomp model, or tiny:<modalities> (e.g. tiny:image,audio,video,point) "
        "for a tiny randomly initialised model built locally",
    )
    p.add_argument(
        "--task", required=True, help="a shipped task (mcub4, mcub3, avqa, music_avqa, modelnet40) or a task .yaml file"
    )
    p.add_argument(
        "--data-root",
        default=".",
        help="directory the task's question/answer files and the media paths are relative to (default: .)",
    )
    p.add_argument("--questions", help="question file to use instead of the task's (one subset)")
    p.add_argument("--answers", help="answer file to use instead of the task's")
    p.add_argument("--subset", action="append", default=[], help="evaluate only this subset (repeatable)")
    p.add_argument("--mode", choices=["generate", "loglik"], help="scoring mode (default: the task's)")
    p.add_argument("--out", required=True, help="run directory (results.json, samples.jsonl); reused to resume")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples of each subset")
    p.add_argument("--feature-cache", help="directory for cached encoder features (shared between runs)")
    p.add_argument("--max-new-tokens", type=int, help="generation length (default: the task's, 128 as published)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the tiny models (tiny:...) and of any sampling (default 0)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="loglik mode: samples whose contexts run as one forward (scores equal up to rounding)",
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: the process's accelerator, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="load the model in this dtype")
    p.add_argument("--force", action="store_true", help="discard the run directory's earlier records and start afresh")
    p.add_argument(
        "--allow-media-outside-root",
        action="store_true",
        help="let a question file's media paths lead outside --data-root ('..', absolute paths, symlinks); "
        "without it such a sample is recorded with an error and not evaluated",
    )
    p.add_argument(
        "--allow-task-code",
        action="store_true",
        help="let a task file import the Python modules and module:function callables it names; "
        "task files are data otherwise",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model on MCUB / AVQA / MUSIC-AVQA / ModelNet40",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def build_tiny_model(spec: str, seed: int = 0):
    """tiny:<m1,m2,...> -> a tiny MultimodalLM with those modality adapters (image, audio, video, point)."""
    from mcomp import tiny

    makers = {
        "image": getattr(tiny, "tiny_image_adapter_config", None),
        "audio": getattr(tiny, "tiny_audio_adapter_config", None),
        "video": getattr(tiny, "tiny_video_adapter_config", None),
        "point": getattr(tiny, "tiny_point_adapter_config", None),
    }
    names = [m.strip() for m in spec[len(TINY_PREFIX) :].split(",") if m.strip()] or ["image"]
    unknown = [m for m in names if makers.get(m) is None]
    if unknown:
        raise ValueError(
            f"--model {spec}: no tiny adapter for {unknown}; available: "
            f"{', '.join(m for m, f in makers.items() if f is not None)}"
        )
    return tiny.build_tiny_mllm([makers[m]() for m in names], seed=seed)


def load_model(spec: str, seed: int, device, dtype: str | None):
    import torch

    if spec.startswith(TINY_PREFIX):
        model = build_tiny_model(spec, seed)
        name = spec
        if dtype:
            model = model.to(getattr(torch, dtype))
        return model.to(device), name
    import mcomp

    if not os.path.isdir(spec):
        raise FileNotFoundError(f"--model {spec}: not a directory (a saved mcomp model) nor tiny:<modalities>")
    kwargs = {"device": str(device)}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    model = mcomp.load(spec, **kwargs)
    return model, os.path.basename(os.path.normpath(spec))


def format_results(results: dict) -> str:
    lines = [f"{results['task']} ({results['mode']}), model {results['model']['name']}"]
    for r in results["metrics"]:
        value = "nan" if r["value"] is None else f"{r['value']:.2f}"
        stderr = "-" if r["stderr"] is None else f"{r['stderr']:.2f}"
        lines.append(
            f"  {r['subset']:<28} {r['metric']:<14} {value:>7} ± {stderr:<6} "
            f"n={r['n_samples']} errors={r['n_errors']} missing_answer={r['n_missing_answer']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from mcomp.benchmarks.mcub.distributed import process_info
    from mcomp.benchmarks.mcub.runner import evaluate
    from mcomp.benchmarks.mcub.tasks import load_task
    from mcomp.fingerprint import directory_digest

    task = load_task(args.task, allow_code=args.allow_task_code)  # bad task: error before loading anything heavy
    task.mode(args.mode)
    task.select_subsets(args.subset)
    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit must be >= 0")
    proc = process_info(args.device)
    torch.manual_seed(args.seed)
    # what run.json records of the model: a tiny model's spec and seed, or the content of the saved
    # directory (read before loading, so a folder rebuilt under the same name is told apart)
    identity = (
        {"tiny": args.model, "seed": args.seed}
        if args.model.startswith(TINY_PREFIX)
        else {"directory_sha256": directory_digest(args.model)}
        if os.path.isdir(args.model)
        else None
    )
    model, name = load_model(args.model, args.seed, proc.device, args.dtype)
    results = evaluate(
        model,
        task,
        data_root=args.data_root,
        out_dir=args.out,
        mode=args.mode,
        subsets=args.subset or None,
        questions=args.questions,
        answers=args.answers,
        limit=args.limit,
        seed=args.seed,
        feature_cache=args.feature_cache,
        max_new_tokens=args.max_new_tokens,
        model_name=name,
        proc=proc,
        batch_size=args.batch_size,
        model_identity=identity,
        force=args.force,
        allow_outside_root=args.allow_media_outside_root,
    )
    if results is not None:
        print(format_results(results))
        print(f"results: {os.path.join(args.out, 'results.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m mcomp.commands.eval ...`), same arguments and errors as `mcomp eval`."""
    p = argparse.ArgumentParser(
        prog="mcomp eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        logger.debug("traceback", exc_info=True)
        print(f"mcomp eval: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
