"""The evaluation loop: samples -> prompts -> model -> per-sample records -> metrics.

Run directory layout:
    run.json            the run's identity: fingerprints of everything that determines the records
                        (model content, question and answer files, task config, mode, limit, seed,
                        generation length, batch size, dtype, device type, media-root policy,
                        code versions)
    samples.part-N.jsonl records appended by process N while the run is going (flush + fsync per line)
    samples.jsonl       all records in question-file order, written when the run completes
    results.json        metrics per subset, sample counts, model provenance, versions, seed; nothing
                        that depends on the clock or on cache warmth, so the same inputs give the same bytes

Resuming: the identity asked for must equal the one in run.json (otherwise the run is refused,
naming what changed; `force` discards the earlier records). Every sample that already has a record
(in any of those files) is skipped, so a run that was killed continues where it stopped; no sample
is evaluated or counted twice. Batches are cut on a fixed grid over all samples in question-file
order and a batch with any sample left runs whole, and each batch seeds the random generators from
its index, so a resumed run's records equal those of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from mcomp import faults
from mcomp.benchmarks.mcub.data import (
    Sample,
    check_answers_match,
    id_key,
    read_answer_file,
    read_questions,
    resolve_media_path,
)
from mcomp.benchmarks.mcub.distributed import ProcessInfo
from mcomp.benchmarks.mcub.features import EvalFeatureCache
from mcomp.benchmarks.mcub.loglik import score_options, score_options_batch
from mcomp.benchmarks.mcub.prompting import build_prompt
from mcomp.benchmarks.mcub.records import RecordWriter, iter_record_files, read_records
from mcomp.benchmarks.mcub.results import MEAN, RESULTS_SCHEMA, ResultsFile  # noqa: F401 (re-exported)
from mcomp.benchmarks.mcub.scoring import accuracy
from mcomp.benchmarks.mcub.tasks import ModeSpec, Task
from mcomp.conversation import CHAT, get_template
from mcomp.errors import MediaBatchError, MediaError, PlaceholderMismatchError
from mcomp.fingerprint import check_same_work, code_versions, fingerprint, tensors_sha256
from mcomp.io import atomic_write_text, sha256_file
from mcomp.progress import progress_bar
from mcomp.scoring import EvalModel

logger = logging.getLogger(__name__)

SAMPLE_ERRORS = (MediaBatchError, MediaError, PlaceholderMismatchError)


@dataclasses.dataclass
class EvalData:
    """Everything read from disk for a run, checked against the task and the model."""

    subsets: list[tuple[str, str, list[Sample]]]  # (subset name, question file, samples)
    answers_path: str
    answers: dict[str, dict]
    targets: dict[tuple[str, str], str | None]  # sample key -> reference (None: not in the answer key)
    all_targets: list[str]  # every reference in the answer file (closed answer sets)

    @property
    def samples(self) -> list[Sample]:
        return [s for _, _, samples in self.subsets for s in samples]


class OptionState:
    """Shared with option functions: the answer key's references and a memo for per-run work."""

    def __init__(self, all_targets: Sequence[str]):
        self._all_targets = list(all_targets)
        self.memo: dict[Any, Any] = {}

    def all_targets(self) -> list[str]:
        return list(self._all_targets)


def load_data(
    task: Task,
    data_root: str | os.PathLike,
    subsets: Sequence[str] | None = None,
    questions: str | os.PathLike | None = None,
    answers: str | os.PathLike | None = None,
    limit: int | None = None,
    allow_outside_root: bool = False,
) -> EvalData:
    """Read the question and answer files of the selected subsets; raise on files that do not fit.
    `allow_outside_root`: media paths may lead outside `data_root` (else such a sample records an error)."""
    selected = task.select_subsets(subsets)
    if questions is not None and len(selected) != 1:
        raise ValueError(
            f"--questions replaces one subset's file, but task {task.name!r} has "
            f"{len(selected)} selected subsets ({', '.join(s.name for s in selected)}); pick one with --subset"
        )
    answers_path = os.fspath(answers) if answers is not None else resolve_media_path(task.answers, data_root)
    answer_key = read_answer_file(answers_path)
    target_fn = task.target_function()
    all_targets = []
    for entry in answer_key.values():
        all_targets.append(target_fn(entry))
    out = []
    targets: dict[tuple[str, str], str | None] = {}
    for subset in selected:
        qpath = os.fspath(questions) if questions is not None else resolve_media_path(subset.questions, data_root)
        samples = read_questions(qpath, subset.name, data_root, allow_outside_root=allow_outside_root)
        check_answers_match(samples, answer_key, answers_path, qpath)
        if limit is not None:
            samples = samples[: max(0, limit)]
        for s in samples:
            entry = answer_key.get(id_key(s.id))
            targets[s.key] = target_fn(entry) if entry is not None else None
        out.append((subset.name, qpath, samples))
    return EvalData(out, answers_path, answer_key, targets, all_targets)


def check_modalities(model, task: Task, data: EvalData) -> None:
    """Every modality a selected subset needs must have an adapter in the model (checked before compute)."""
    have = list(model.modalities)
    for subset in task.select_subsets([name for name, _, _ in data.subsets]):
        for modality in subset.modalities:
            if modality not in have:
                raise ValueError(
                    f"task {task.name!r} subset {subset.name!r} needs the {modality!r} modality, but the "
                    f"model has only: {', '.join(have) or 'none'}"
                )
    for _, qpath, samples in data.subsets:
        for s in samples:
            for key in s.media:
                try:
                    model.modality_of(key)
                except PlaceholderMismatchError:
                    raise ValueError(
                        f"{qpath}: sample {s.id!r} has {key!r} inputs, but the model has no adapter "
                        f"for them (it has: {', '.join(have) or 'none'})"
                    ) from None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("mcomp", "torch", "transformers", "accelerate", "datasets", "peft"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _file_digest(path: str) -> str:
    return sha256_file(path) if os.path.isfile(path) else ""


@dataclasses.dataclass
class _OptionRequest:
    """A log-likelihood sample prepared up to scoring: its record so far and what to score."""

    record: dict[str, Any]
    options: list
    continuations: list[str]
    prompt: str
    media: Mapping[str, Any]
    target: str | None


def evaluate_sample(
    model,
    task: Task,
    mode: str,
    spec: ModeSpec,
    sample: Sample,
    target: str | None,
    state: OptionState,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """One per-sample record. Media problems are recorded in `error` (the sample then counts as wrong)."""
    return evaluate_samples(model, task, mode, spec, [sample], [target], state, max_new_tokens)[0]


def evaluate_samples(
    model,
    task: Task,
    mode: str,
    spec: ModeSpec,
    samples: Sequence[Sample],
    targets: Sequence[str | None],
    state: OptionState,
    max_new_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Records of `samples`, in order. In log-likelihood mode their contexts run as one batch
    (`MultimodalLM.loglikelihood_batch`); if that batch meets a bad input, its samples are scored
    one at a time, so only the sample at fault records the error."""
    records, pending = [], []
    for sample, target in zip(samples, targets):
        prepared = _prepare_sample(model, task, mode, spec, sample, target, state, max_new_tokens)
        if isinstance(prepared, _OptionRequest):
            pending.append(prepared)
            prepared = prepared.record  # filled in once scored
        records.append(prepared)
    if not pending:
        return records
    scorer = task.resolve("scorer", spec.scorer)
    try:
        batch = (
            score_options_batch(
                model, [(p.prompt, p.continuations, p.media) for p in pending], batch_size=spec.option_batch_size
            )
            if len(pending) > 1
            else None
        )
    except SAMPLE_ERRORS:
        batch = None
    for k, p in enumerate(pending):
        try:
            scores = (
                batch[k]
                if batch is not None
                else score_options(model, p.prompt, p.continuations, p.media, batch_size=spec.option_batch_size)
            )
        except SAMPLE_ERRORS as err:
            p.record["error"] = f"{type(err).__name__}: {err}"
            continue
        _record_scores(p, scores, scorer)
    return records


def _prepare_sample(
    model,
    task: Task,
    mode: str,
    spec: ModeSpec,
    sample: Sample,
    target: str | None,
    state: OptionState,
    max_new_tokens: int | None,
) -> dict[str, Any] | _OptionRequest:
    """The finished record (generation, or an error), or what a log-likelihood sample has left to score."""
    # a model with its own chat template is prompted with it: the task's template is the published one
    template = model.template if getattr(model.template, "name", None) == CHAT else get_template(task.template)
    record: dict[str, Any] = {
        "subset": sample.subset,
        "id": sample.id,
        "index": sample.index,
        "mode": mode,
        "prompt": None,
        "target": target,
        "prediction": None,
        "correct": False,
        "error": sample.error,
        "media_ignored": False,
        "media": {k: list(v) for k, v in sample.media.items()},  # shown by the leaderboard's drill-down
    }
    if mode == "generate":
        record["response"] = None
    else:
        record.update(option_scores=None, prediction_norm=None, correct_norm=False)
    try:
        prompt, media, record["media_ignored"] = build_prompt(
            model, template, sample, task.modality_order, task.media_without_placeholder
        )
    except SAMPLE_ERRORS as err:  # e.g. a media key the model has no adapter for
        record["error"] = record["error"] or f"{type(err).__name__}: {err}"
        return record
    record["prompt"] = prompt
    if sample.error is not None:
        return record
    try:
        if mode == "generate":
            scorer = task.resolve("scorer", spec.scorer)
            tokens = max_new_tokens if max_new_tokens is not None else spec.max_new_tokens
            response = model.generate([prompt], [media], max_new_tokens=tokens)[0]
            record["response"] = response
            prediction, correct = scorer(response, target if target is not None else "")
            record.update(prediction=prediction, correct=bool(correct) and target is not None)
            return record
        options_fn = task.resolve("options", spec.options)
        try:
            options = options_fn(sample, state, **dict(spec.options_params))
        except ValueError as err:
            record["error"] = f"options: {err}"
            return record
    except SAMPLE_ERRORS as err:
        record["error"] = f"{type(err).__name__}: {err}"
        return record
    return _OptionRequest(record, options, [o.continuation(spec.continuation) for o in options], prompt, media, target)


def _record_scores(p: _OptionRequest, scores, scorer) -> None:
    record, options, continuations, target = p.record, p.options, p.continuations, p.target
    record["option_scores"] = [
        {
            "key": o.key,
            "continuation": c,
            "logprob": s.logprob,
            "num_tokens": s.num_tokens,
            "num_chars": len(c),
            "is_greedy": s.is_greedy,
        }
        for o, c, s in zip(options, continuations, scores)
    ]
    best = max(range(len(scores)), key=lambda i: (scores[i].logprob, -i))
    best_norm = max(range(len(scores)), key=lambda i: (scores[i].logprob / max(1, len(continuations[i])), -i))
    prediction, correct = scorer(options[best].key, target if target is not None else "")
    prediction_n, correct_n = scorer(options[best_norm].key, target if target is not None else "")
    record.update(
        prediction=prediction,
        correct=bool(correct) and target is not None,
        prediction_norm=prediction_n,
        correct_norm=bool(correct_n) and target is not None,
    )


def model_fingerprint(model) -> dict[str, Any]:
    """The identity of an in-memory model, for `evaluate` called without `model_identity`: its class,
    the digest of its weights and the settings that steer its forward pass (prompt template,
    adapter configs, LoRA routes). The tokenizer is not covered: pass `model_identity` where it may
    change while the weights stay."""
    routing = getattr(model, "routing", None)
    template = getattr(model, "template", None)
    adapters = getattr(model, "adapters", None) or {}
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "state_sha256": tensors_sha256(model.state_dict()),
        "settings": fingerprint(
            {
                "template": getattr(template, "name", None),
                "adapters": {
                    m: a.config.to_dict() if hasattr(getattr(a, "config", None), "to_dict") else None
                    for m, a in adapters.items()
                },
                "routes": {r: [[n, c] for n, c in t] for r, t in getattr(routing, "routes", {}).items()}
                if routing is not None
                else None,
            }
        ),
    }


def _identity(
    task: Task,
    mode: str,
    spec: ModeSpec,
    data: EvalData,
    limit,
    seed,
    max_new_tokens,
    step: int,
    model,
    model_identity: Mapping[str, Any],
    allow_outside_root: bool,
) -> dict[str, Any]:
    first = next(model.parameters())
    return {
        "task": task.name,
        "task_config": fingerprint(task.raw),
        "mode": mode,
        "subsets": [name for name, _, _ in data.subsets],
        "questions_sha256": {name: _file_digest(q) for name, q, _ in data.subsets},
        "answers_sha256": _file_digest(data.answers_path),
        "limit": limit,
        "seed": seed,
        "max_new_tokens": (max_new_tokens if max_new_tokens is not None else spec.max_new_tokens)
        if mode == "generate"
        else None,
        "batch_size": step,
        "dtype": str(first.dtype).replace("torch.", ""),
        "device": first.device.type,
        "allow_outside_root": allow_outside_root,  # decides whether such a sample is scored or an error
        "model": dict(model_identity),
        "code": code_versions(),
    }


RUN_FILES = ("run.json", "results.json", "samples.jsonl")


def _discard_run(run_dir: Path) -> None:
    """Remove an earlier run's files (only those: the directory and anything else in it stay)."""
    for path in [*(run_dir / name for name in RUN_FILES), *sorted(run_dir.glob("samples.part-*.jsonl"))]:
        if path.is_file():
            logger.info("--force: removing %s", path)
            path.unlink()


def _check_or_write_identity(run_dir: Path, identity: dict, proc: ProcessInfo) -> None:
    path = run_dir / "run.json"
    if proc.is_main and not path.is_file():
        atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True) + "\n")
    proc.barrier()
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    check_same_work(
        str(run_dir),
        old,
        identity,
        "its records are not those of this evaluation; `mcomp eval --force` (evaluate(force=True)) "
        "discards them and starts afresh, or use another --out directory",
    )


def _seed_batch(seed: int, index: int) -> None:
    """Seed the generators from the run's seed and the batch's index, so a batch's work does not
    depend on which batches ran before it in this process."""
    value = int(fingerprint([seed, index])[:15], 16)
    random.seed(value)
    torch.manual_seed(value)


def _done_keys(run_dir: Path) -> set[tuple[str, str]]:
    return {(r["subset"], id_key(r["id"])) for p in iter_record_files(run_dir) for r in read_records(p)}


def evaluate(
    model,
    task: Task,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    mode: str | None = None,
    subsets: Sequence[str] | None = None,
    questions: str | os.PathLike | None = None,
    answers: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    feature_cache: str | os.PathLike | None = None,
    max_new_tokens: int | None = None,
    model_name: str | None = None,
    proc: ProcessInfo | None = None,
    on_record: Callable[[dict], None] | None = None,
    batch_size: int = 1,
    model_identity: Mapping[str, Any] | None = None,
    force: bool = False,
    allow_outside_root: bool = False,
) -> dict[str, Any] | None:
    """Evaluate `model` on `task`; returns the results (on the main process; None on the others).

    `batch_size`: in log-likelihood mode, samples whose contexts run as one forward (the scores
    equal one-at-a-time scoring up to float rounding; a given batch size always gives the same bits).
    `model_identity`: what identifies the model's content in run.json (`mcomp eval` passes the saved
    directory's digest, or the tiny spec and seed); None: `model_fingerprint(model)`, a digest of the
    in-memory weights and settings. `force`: discard the run directory's earlier run files first.
    `allow_outside_root`: media paths may lead outside `data_root` (else such a sample records an error)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(model, EvalModel):
        raise TypeError(
            f"{type(model).__name__} is not an evaluation model: it needs generate, loglikelihood and "
            f"loglikelihood_batch (mcomp.scoring.EvalModel)"
        )
    proc = proc or ProcessInfo()
    mode, spec = task.mode(mode)
    data = load_data(task, data_root, subsets, questions, answers, limit, allow_outside_root=allow_outside_root)
    check_modalities(model, task, data)
    model_name = model_name or type(model).__name__
    step = batch_size if mode == "loglik" else 1  # generation runs one sample at a time
    identity = _identity(
        task,
        mode,
        spec,
        data,
        limit,
        seed,
        max_new_tokens,
        step,
        model,
        model_identity if model_identity is not None else model_fingerprint(model),
        allow_outside_root,
    )
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if force and proc.is_main:
        _discard_run(run_dir)
    _check_or_write_identity(run_dir, identity, proc)

    done = _done_keys(run_dir)
    proc.barrier()  # every process has read the same finished samples before any writes more
    samples = data.samples
    # a fixed grid over all samples: batch k is samples[k*step:(k+1)*step] on process k % world_size,
    # whatever ran before, so a resumed batch is the same batch as in an uninterrupted run
    batches = [(k, samples[first : first + step]) for k, first in enumerate(range(0, len(samples), step))]
    mine = [
        (k, batch) for k, batch in batches if k % proc.world_size == proc.rank and any(s.key not in done for s in batch)
    ]
    n_mine = sum(1 for _, batch in mine for s in batch if s.key not in done)
    logger.info(
        "%s/%s: %d sample(s), %d already done, %d for process %d",
        task.name,
        mode,
        len(samples),
        sum(1 for s in samples if s.key in done),
        n_mine,
        proc.rank,
    )

    state = OptionState(data.all_targets)
    previous_cache = getattr(model, "feature_cache", None)
    adapters = getattr(model, "adapters", None) or {}
    cache = EvalFeatureCache(feature_cache, encoders=adapters.values())
    model.feature_cache = cache
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    written = ignored = 0
    try:
        bar = progress_bar(total=n_mine, desc=f"{task.name} {mode}", unit="sample", leave=True)
        with RecordWriter(run_dir / f"samples.part-{proc.rank}.jsonl") as writer, bar:
            for k, batch in mine:
                _seed_batch(seed, k)
                records = evaluate_samples(
                    model, task, mode, spec, batch, [data.targets[s.key] for s in batch], state, max_new_tokens
                )
                for sample, record in zip(batch, records):
                    if sample.key in done:
                        continue  # recorded by an earlier session; the batch ran whole for the others' sake
                    record = _finite(record)
                    writer.write(record)
                    faults.point("eval.record")
                    written += 1
                    bar.update(1)
                    if record["error"]:
                        logger.warning("sample %r (%s): %s", sample.id, sample.subset, record["error"])
                    if record["media_ignored"]:
                        ignored += 1
                        if ignored == 1:
                            logger.warning(
                                "sample %r (%s) has media but no placeholder: it is answered from its "
                                "text alone, as the published model does (task prompt option "
                                "media_without_placeholder: prefix puts the media in); more are "
                                "counted at the end",
                                sample.id,
                                sample.subset,
                            )
                    if on_record is not None:
                        on_record(record)
                    if written % 50 == 0:
                        rate = written / max(time.perf_counter() - start, 1e-9)
                        logger.info("process %d: %d/%d samples (%.2f/s)", proc.rank, written, n_mine, rate)
    finally:
        model.feature_cache = previous_cache
        model.train(was_training)
    elapsed = time.perf_counter() - start
    # session figures go to the log, not results.json: they depend on the clock and on cache warmth
    logger.info("process %d: %d sample(s) in %.1f s; feature cache %s", proc.rank, written, elapsed, cache.stats())
    if ignored:
        logger.warning(
            "process %d: %d sample(s) had media but no placeholder; their media were not used", proc.rank, ignored
        )
    proc.barrier()
    if not proc.is_main:
        return None
    records = merge_records(run_dir, data)
    results = compute_results(task, mode, data, records)
    payload = {
        "schema": RESULTS_SCHEMA,
        "task": task.name,
        "mode": mode,
        "description": task.description,
        "results": results,
        "model": {
            "name": model_name,
            "class": type(model).__name__,
            "modalities": list(model.modalities),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        },
        "provenance": dict(getattr(model, "provenance", None) or {}),
        "prompt": {
            "template": task.template,
            "modality_order": list(task.modality_order),
            "media_without_placeholder": task.media_without_placeholder,
        },
        "data": {
            "data_root": os.path.abspath(data_root),
            "questions": {
                name: {"path": os.path.abspath(q), "sha256": identity["questions_sha256"][name]}
                for name, q, _ in data.subsets
            },  # hashed once, for the run identity
            "answers": {"path": os.path.abspath(data.answers_path), "sha256": identity["answers_sha256"]},
        },
        "task_config": dict(task.raw),
        "seed": seed,
        "limit": limit,
        "max_new_tokens": (max_new_tokens if max_new_tokens is not None else spec.max_new_tokens)
        if mode == "generate"
        else None,
        "versions": _versions(),
        "run": {
            "world_size": proc.world_size,
            "feature_cache_dir": os.path.abspath(feature_cache) if feature_cache else None,
        },
    }
    # NaN (e.g. the standard error of a single sample) -> None, as written; the schema checks the rest
    payload = ResultsFile.from_fields(_finite(payload), str(run_dir / "results.json")).to_dict()
    atomic_write_text(run_dir / "results.json", json.dumps(payload, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %s", run_dir / "results.json")
    return payload


def merge_records(run_dir: Path, data: EvalData) -> list[dict[str, Any]]:
    """All records of the run in question-file order in `samples.jsonl`; the shard files are then removed."""
    by_key: dict[tuple[str, str], dict] = {}
    files = list(iter_record_files(run_dir))
    for path in files:
        for record in read_records(path):
            by_key.setdefault((record["subset"], id_key(record["id"])), record)
    ordered, missing = [], []
    for s in data.samples:
        if s.key in by_key:
            ordered.append(by_key[s.key])
        else:
            missing.append(s)
    if missing:
        raise RuntimeError(
            f"{run_dir}: {len(missing)} sample(s) have no record after all processes finished "
            f"(e.g. {missing[0].subset} id {missing[0].id!r}); re-run the same command to finish"
        )
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in ordered)
    atomic_write_text(run_dir / "samples.jsonl", text)
    for path in files:
        if path.name != "samples.jsonl":
            path.unlink()
    return ordered


def compute_results(task: Task, mode: str, data: EvalData, records: Sequence[Mapping]) -> list[dict[str, Any]]:
    """Accuracy (x100) and its standard error per subset; with several subsets, their mean too.

    Denominator = every sample of the subset (one line each, as published): errors and ids missing from
    the answer key count as wrong and are reported in `n_errors` / `n_missing_answer`.
    """
    metrics = ["accuracy"] + (["accuracy_norm"] if mode == "loglik" else [])
    out = []
    for name, _, _samples in data.subsets:
        subset_records = [r for r in records if r["subset"] == name]
        for metric in metrics:
            field = "correct" if metric == "accuracy" else "correct_norm"
            flags = [bool(r.get(field)) for r in subset_records]
            value, stderr = accuracy(flags)
            out.append(
                {
                    "task": task.name,
                    "subset": name,
                    "mode": mode,
                    "metric": metric,
                    "value": value,
                    "stderr": stderr,
                    "n_samples": len(subset_records),
                    "n_correct": sum(flags),
                    "n_errors": sum(1 for r in subset_records if r.get("error")),
                    "n_missing_answer": sum(1 for r in subset_records if r.get("target") is None),
                }
            )
    if len(data.subsets) > 1:
        for metric in metrics:
            rows = [r for r in out if r["metric"] == metric]
            k = len(rows)
            out.append(
                {
                    "task": task.name,
                    "subset": MEAN,
                    "mode": mode,
                    "metric": metric,
                    "value": sum(r["value"] for r in rows) / k,
                    "stderr": math.sqrt(sum(r["stderr"] ** 2 for r in rows)) / k,
                    "n_samples": sum(r["n_samples"] for r in rows),
                    "n_correct": sum(r["n_correct"] for r in rows),
                    "n_errors": sum(r["n_errors"] for r in rows),
                    "n_missing_answer": sum(r["n_missing_answer"] for r in rows),
                }
            )
    return out


def _finite(obj):
    """NaN/inf (e.g. the standard error of one sample) become null in JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
