"""Training a single-modality MLLM (the published two-stage recipe) on accelerate.

Stage 1: projector only, LLM frozen; optionally with caption distillation (`caption_distill`, not
in the published recipe): the frozen LLM reading each sample with its media's captions in place of
the media is the teacher, and the hidden states of every layer at the positions after the media are
pulled towards the teacher's, so that projected media tokens act on the LLM like their caption's
words. Stage 2: LoRA on the LLM's linear layers plus the projector.
Decoupled (DAMC): a text LoRA and a modality LoRA on every targeted layer, routed per token,
plus learnable prefix/suffix tokens around each modality input.

Resumable: every `save_every` steps the trainable weights (safetensors), optimizer state (read
back with weights_only=True), RNG state and position in the data are written atomically under
the checkpoint folder; a new run with the same folder continues from the latest one and ends
with the same weights as an uninterrupted run. Each checkpoint records the run's identity (config,
data, starting weights, code: `run_identity`); a run of other work is refused, naming what changed,
rather than continued from it, and `restart=True` (`mcomp train --force`) clears the folder instead.
Before step 1 the data is checked against the model (`mcomp.data.check_training_data`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from mcomp import faults
from mcomp.configuration import JsonConfig
from mcomp.data import ConversationSample, TrainingDataError, check_training_data, media_digest, samples_digest
from mcomp.fingerprint import (
    IdentityMismatch,
    canonical_json,
    check_same_work,
    code_versions,
    fingerprint,
    tensors_sha256,
)
from mcomp.io import atomic_directory, load_tensors, output_lock, save_tensors
from mcomp.lora import TEXT_ROUTE, LoraSpec, family_targets
from mcomp.progress import progress_bar
from mcomp.tokenization import placeholder_pattern

logger = logging.getLogger(__name__)

LR_SCHEDULERS = ("constant", "cosine")


@dataclasses.dataclass
class TrainConfig(JsonConfig):
    stage: int = 2
    decoupled: bool = False
    full: bool = False  # stage 2 trains the whole LLM (a full fine-tune) instead of a LoRA
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=list)  # empty: the base family's (family_targets)
    prefix_tokens: int = 5  # decoupled only (published: 5/5)
    suffix_tokens: int = 5
    learning_rate: float = 2e-4
    projector_lr: float | None = None  # default: learning_rate; 0 keeps the projector as it is
    text_lora_with_projector: bool = False  # DAMC: the text LoRA learns at projector_lr (published mm_language_lr)
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 4  # per process
    grad_accum: int = 1
    global_batch_size: int = 0  # > 0: grad_accum = global_batch_size / (batch_size x processes)
    drop_last: bool = False  # an epoch leaves out its last, incomplete batch (the published dataloader does)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # without warmup_steps: ceil(ratio x total steps), as transformers' Trainer
    lr_scheduler: str = "constant"  # or "cosine" (LLaVA's recipe: decays to 0 at the last step)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0  # steps between resumable checkpoints (0: only at the end)
    log_every: int = 10
    caption_distill: float = 0.0  # stage 1: weight of the hidden-state loss against the caption text form

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.decoupled and self.stage != 2:
            raise ValueError("decoupled (DAMC) training is a stage-2 setting")
        if self.full and (self.stage != 2 or self.decoupled):
            raise ValueError("full fine-tuning is a stage-2 setting without decoupled (DAMC) parameters")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.caption_distill and self.stage != 1:
            raise ValueError("caption_distill is a stage-1 setting (the frozen LLM is its teacher)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.global_batch_size and self.global_batch_size % self.batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of batch_size {self.batch_size}"
            )
        if self.text_lora_with_projector and not self.decoupled:
            raise ValueError("text_lora_with_projector is a DAMC (decoupled) setting")
        for name in ("learning_rate", "projector_lr", "caption_distill"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "epochs", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """`warmup_steps`, else ceil(warmup_ratio x total) (transformers' `TrainingArguments.get_warmup_steps`)."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(total * cfg.warmup_ratio)


def lr_factor(cfg: TrainConfig, total: int, step: int) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based): linear warmup from
    0, then constant or a cosine decay that reaches 0 after the last step (transformers'
    `get_{constant,cosine}_schedule_with_warmup`, which LLaVA's trainer uses)."""
    warmup = warmup_steps(cfg, total)
    if step < warmup:
        return step / warmup
    if cfg.lr_scheduler == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def effective_grad_accum(cfg: TrainConfig, processes: int) -> int:
    """Micro-batches per optimizer step: `grad_accum`, or what makes `global_batch_size` on `processes`."""
    if not cfg.global_batch_size:
        return cfg.grad_accum
    per_step = cfg.batch_size * processes
    if cfg.global_batch_size % per_step:
        raise ValueError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of batch_size {cfg.batch_size} "
            f"x {processes} process(es)"
        )
    return cfg.global_batch_size // per_step


def optimizer_groups(params: Mapping[str, torch.nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """Learning-rate groups: the projectors (with the text LoRA when `text_lora_with_projector`, as
    the published trainer does when mm_language_lr is set) at projector_lr, the rest at learning_rate."""
    text_lora = (f".lora_A.{TEXT_ROUTE}", f".lora_B.{TEXT_ROUTE}")
    with_projector = [
        n for n in params if ".projector." in n or (cfg.text_lora_with_projector and n.endswith(text_lora))
    ]
    rest = [n for n in params if n not in set(with_projector)]
    groups = [
        {
            "params": [params[n] for n in with_projector],
            "lr": cfg.learning_rate if cfg.projector_lr is None else cfg.projector_lr,
        }
    ]
    if rest:
        groups.append({"params": [params[n] for n in rest], "lr": cfg.learning_rate})
    return groups


def prepare_for_training(model, cfg: TrainConfig) -> None:
    """Add what the stage trains (LoRA, routes, DAMC tokens) and freeze everything else."""
    modality = _single_modality(model)
    if cfg.full:
        if model.lora_adapters:
            raise ValueError(
                f"full fine-tuning a model that has LoRA adapters ({model.lora_adapters}); start from stage 1"
            )
        if model.finetuned_from is None:
            from mcomp.checkpoint import base_reference

            model.finetuned_from = base_reference(model.llm)
    elif cfg.stage == 2:
        targets = list(cfg.target_modules) or family_targets(model.llm)
        spec = LoraSpec(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets)
        if TEXT_ROUTE not in model.lora_adapters:
            model.add_lora(spec, name=TEXT_ROUTE, seed=cfg.seed)
        routes = {TEXT_ROUTE: [(TEXT_ROUTE, 1.0)]}
        if cfg.decoupled:
            if modality not in model.lora_adapters:
                model.add_lora(spec, name=modality, seed=cfg.seed + 1)
            routes[modality] = [(modality, 1.0)]
            if modality not in model.prefix_tokens and modality not in model.suffix_tokens:
                model.add_modality_tokens(modality, cfg.prefix_tokens, cfg.suffix_tokens)
        model.set_routes(routes)
    model.requires_grad_(False)
    for p in trainable_parameters(model).values():
        p.requires_grad_(True)


def _single_modality(model) -> str:
    if len(model.modalities) != 1:
        raise ValueError(f"a modality MLLM is trained with exactly one adapter, this model has {model.modalities}")
    return model.modalities[0]


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Projectors, LoRA factors and DAMC tokens, by their names in the model; the whole LLM too for a
    full fine-tune."""
    out = {}
    full = model.finetuned_from is not None
    for name, p in model.named_parameters():
        if (
            (full and name.startswith("llm."))
            or ".projector." in name
            or ".lora_A." in name
            or ".lora_B." in name
            or name.startswith(("prefix_tokens.", "suffix_tokens."))
        ):
            out[name] = p
    return out


STEP_DIR = re.compile(r"step-(\d+)")
RESTART_HINT = (
    "`mcomp train --force` (from Python: train(..., restart=True)) starts afresh, or choose another checkpoint folder"
)


def _latest_checkpoint(folder: Path) -> Path | None:
    steps = sorted(
        (int(p.name.split("-")[1]), p)
        for p in folder.glob("step-*")
        if STEP_DIR.fullmatch(p.name) and (p / "trainer_state.json").is_file()
    )
    return steps[-1][1] if steps else None


def run_identity(
    model, samples: list[ConversationSample], cfg: TrainConfig, identity: Mapping[str, Any] | None = None
) -> dict:
    """What determines a training run's result, as recorded in its checkpoints: the caller's
    `identity` (what train() cannot see: the data file, the base LLM), the config, the samples and
    the media files' list with sizes, the frozen encoders, the trainable parameters' names, shapes
    and starting values (call after `prepare_for_training`), and the code versions."""
    params = trainable_parameters(model)
    own = {
        "config": cfg.to_dict(),
        "samples_sha256": samples_digest(samples),
        "media_sha256": media_digest(samples),
        "encoders": {m: adapter.fingerprint() for m, adapter in model.adapters.items()},
        "trainable": {
            "count": len(params),
            "shapes_sha256": fingerprint({n: list(p.shape) for n, p in params.items()}),
            "sha256": tensors_sha256(params),
        },
        "code": code_versions(),
    }
    clash = sorted(set(own) & set(identity or {}))
    if clash:
        raise ValueError(f"identity: field(s) {clash} are train()'s own; name the caller's fields otherwise")
    # as it reads back from trainer_state.json (tuples become lists), so that equal runs compare equal
    return json.loads(canonical_json({**(identity or {}), **own}))


def check_resumable(folder: Path, wanted: Mapping[str, Any]) -> None:
    """Refuse checkpoint `folder` unless it was written by the same run (`run_identity`)."""
    state = json.loads((folder / "trainer_state.json").read_text())
    recorded = state.get("identity")
    if recorded is None:
        raise IdentityMismatch(
            f"{folder} records no run identity (written by an older mcomp), so it cannot be "
            f"told apart from other work; {RESTART_HINT}"
        )
    check_same_work(f"checkpoint {folder}", recorded, wanted, RESTART_HINT)


def check_clearable(folder: Path) -> None:
    """Refuse to clear `folder` unless it is empty or looks like a training checkpoint folder:
    step-N checkpoints (one at least with its trainer_state.json) and what an interrupted save
    leaves (hidden .step-N... entries); whatever else it holds might not be ours to delete."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {folder} is not a folder; choose another checkpoint folder")
    entries = list(folder.iterdir())
    strays = sorted(
        e.name for e in entries if not ((STEP_DIR.fullmatch(e.name) and e.is_dir()) or e.name.startswith(".step-"))
    )
    steps = [e for e in entries if STEP_DIR.fullmatch(e.name)]
    if strays or (steps and not any((e / "trainer_state.json").is_file() for e in steps)):
        shown = (
            ", ".join(strays[:5]) + (" ..." if len(strays) > 5 else "")
            if strays
            else "step folders without trainer_state.json"
        )
        raise ValueError(
            f"checkpoint folder {folder} does not look like an mcomp training checkpoint folder "
            f"(it holds {shown}); refusing to clear it: choose another checkpoint folder"
        )


def clear_checkpoints(folder: Path) -> None:
    """Delete what `check_clearable` accepted (the folder itself stays: it may be a symlink)."""
    check_clearable(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    logger.info("cleared the checkpoints in %s (restart)", folder)


def _batch_inputs(core, batch: list[ConversationSample]):
    """The batch's training inputs; a data error names the samples' ids and files, not their
    positions in the batch."""
    from mcomp.errors import MediaBatchError, SampleError

    try:
        return core.prepare_conversations([s.conversations for s in batch], [s.media for s in batch])
    except MediaBatchError as err:
        lines = [f"sample {batch[i].id}: {failure}" for i, failure in err.failures.items()]
        raise TrainingDataError(
            f"{len(lines)} sample(s) of a training batch have unusable media:\n  " + "\n  ".join(lines)
        ) from err
    except ValueError as err:
        if isinstance(err, SampleError) and err.sample is not None and err.sample < len(batch):
            s = batch[err.sample]
            files = [f for v in s.media.values() for f in v]
            raise TrainingDataError(f"sample {s.id} (media: {', '.join(files) or 'none'}): {err.reason}") from err
        raise TrainingDataError(f"a training batch of samples {', '.join(str(s.id) for s in batch)}: {err}") from err


def train(
    model,
    samples: list[ConversationSample],
    cfg: TrainConfig,
    checkpoint_dir: str | os.PathLike,
    stop_after: int | None = None,
    *,
    identity: Mapping[str, Any] | None = None,
    restart: bool = False,
    allow_media_outside_root: bool = False,
) -> dict:
    """Train in place; returns a summary. `stop_after` ends early after that many steps (tests
    use it to simulate an interruption).

    Resumes from the latest checkpoint in `checkpoint_dir` if it records the same run identity
    (`run_identity`: `identity`, the caller's fields, e.g. the data file's and base LLM's checksums,
    plus train()'s own), refuses it otherwise; `restart` clears the folder (only a checkpoint
    folder) and starts from step 0. The data is checked before step 1 (`check_training_data`;
    `allow_media_outside_root` lets media lie outside their data root). The folder is locked
    while training: a second run with the same folder fails at once."""
    from accelerate import Accelerator

    if not samples:
        raise ValueError("no training samples")
    if cfg.caption_distill:
        missing = [s.id for s in samples if any(len(s.captions.get(k, [])) != len(v) for k, v in s.media.items())]
        if missing:
            raise ValueError(
                f"caption_distill needs media_captions for every media file; missing in sample(s) "
                f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}"
            )
    checkpoint_dir = Path(checkpoint_dir)
    from accelerate import PartialState

    grad_accum = effective_grad_accum(cfg, PartialState(cpu=not torch.cuda.is_available()).num_processes)
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=not torch.cuda.is_available())
    with contextlib.ExitStack() as stack:
        if accelerator.is_main_process:  # the other ranks of a multi-GPU run share the main one's folder
            checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(output_lock(checkpoint_dir))
        return _train(
            accelerator, model, samples, cfg, checkpoint_dir, stop_after, identity, restart, allow_media_outside_root
        )


def _train(
    accelerator, model, samples, cfg, checkpoint_dir: Path, stop_after, identity, restart, allow_media_outside_root
) -> dict:
    from accelerate.utils import set_seed

    if restart:
        check_clearable(checkpoint_dir)  # refused before anything is computed
    set_seed(cfg.seed)
    prepare_for_training(model, cfg)
    with torch.random.fork_rng(devices=[]):  # the checks leave the training's random stream as seeded
        wanted = run_identity(model, samples, cfg, {**(identity or {}), "processes": accelerator.num_processes})
        latest = None if restart else _latest_checkpoint(checkpoint_dir)
        if latest is not None:
            check_resumable(latest, wanted)
        check_training_data(
            samples, model, allow_media_outside_root=allow_media_outside_root, progress=accelerator.is_main_process
        )
    if restart and accelerator.is_main_process:
        clear_checkpoints(checkpoint_dir)
    accelerator.wait_for_everyone()
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(optimizer_groups(params, cfg), weight_decay=cfg.weight_decay)
    grad_accum = accelerator.gradient_accumulation_steps
    per_epoch = len(samples) // cfg.batch_size if cfg.drop_last else math.ceil(len(samples) / cfg.batch_size)
    if per_epoch < 1:
        raise ValueError(f"{len(samples)} sample(s) make no whole batch of {cfg.batch_size} (drop_last)")
    total = cfg.max_steps or math.ceil(per_epoch * cfg.epochs / grad_accum)  # micro-batches per epoch: per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg, total))
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)

    step, losses, learning_rates = 0, [], []
    if latest is not None:
        step, losses = _restore(core, optimizer, scheduler, latest)
        logger.info("resumed from %s (step %d)", latest, step)
    resumed_from = step

    core.train()
    bar = progress_bar(total=total, initial=step, desc=f"train stage {cfg.stage}", enabled=accelerator.is_main_process)
    micro = step * grad_accum  # micro-batches consumed so far: a flat stream over seeded epochs
    order, order_epoch = None, -1
    while step < total and (stop_after is None or step < stop_after):
        epoch, k = divmod(micro, per_epoch)
        if epoch != order_epoch:
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
            order_epoch = epoch
        batch = [samples[i] for i in order[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
        micro += 1
        with accelerator.accumulate(model):
            inputs = _batch_inputs(core, batch)
            if cfg.caption_distill:
                loss = _caption_distilled_loss(model, core, batch, inputs, cfg.caption_distill)
            else:
                loss = model(inputs, share_prefix=True).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            rates = [g["lr"] for g in optimizer.param_groups]  # what this optimizer step uses
            optimizer.step()
            if accelerator.sync_gradients:  # one schedule step per optimizer step, not per micro-batch
                scheduler.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step += 1
        learning_rates.append(rates)
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if cfg.log_every and step % cfg.log_every == 0:
            recent = losses[-cfg.log_every :]
            logger.info("step %d/%d loss %.4f", step, total, sum(recent) / len(recent))
        if accelerator.is_main_process and ((cfg.save_every and step % cfg.save_every == 0) or step == total):
            _save_checkpoint(core, optimizer, scheduler, checkpoint_dir / f"step-{step}", step, losses, wanted)
            faults.point("train.checkpoint_saved")
    bar.close()
    core.eval()
    return {
        "steps": step,
        "total_steps": total,
        "resumed_from": resumed_from,
        "grad_accum": grad_accum,
        "learning_rates": learning_rates,  # per optimizer step of this run, per parameter group
        "final_loss": losses[-1] if losses else None,
        "mean_loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "losses": losses,
    }


def caption_text_form(model, sample: ConversationSample) -> list[dict]:
    """The sample's turns with each media placeholder replaced by that media file's caption."""
    queues = {}  # placeholder tag -> captions in media order
    for key, texts in sample.captions.items():
        queues.setdefault(model.adapters[model.modality_of(key)].placeholder, []).extend(texts)
    pattern = placeholder_pattern(model.placeholder_ids)
    return [
        {**turn, "value": pattern.sub(lambda tag: queues[tag.group(0)].pop(0), turn["value"])}
        if turn.get("value")
        else turn
        for turn in sample.conversations
    ]


def _caption_distilled_loss(model, core, batch: list[ConversationSample], inputs, weight: float) -> torch.Tensor:
    """Answer loss + `weight` x the mean over layers of the squared distance between the hidden states
    after the media and the teacher's (the frozen LLM on the caption text form) at the same positions.

    Rows are left-padded, so positions are aligned from the end: the last K of both, K the fewest
    positions after the last media token in any row. (The separator the tokenizer puts after a
    placeholder pairs with the caption's last word: the first position that has read the input.)"""
    text_form = core.prepare_conversations([caption_text_form(core, s) for s in batch])
    with torch.no_grad():  # hidden states only: no labels, so no teacher loss is computed
        teacher = model(dataclasses.replace(text_form, labels=None), output_hidden_states=True).hidden_states
    out = model(inputs, output_hidden_states=True)
    length = inputs.modality_ids.shape[1]
    positions = torch.arange(length, device=inputs.modality_ids.device).expand_as(inputs.modality_ids)
    last_media = torch.where(inputs.modality_ids >= 0, positions, -1).max(dim=1).values
    k = int((length - 1 - last_media).min())
    layers = range(1, len(out.hidden_states))
    distance = sum(torch.nn.functional.mse_loss(out.hidden_states[h][:, -k:], teacher[h][:, -k:]) for h in layers)
    return out.loss + weight * distance / len(layers)


def _save_checkpoint(model, optimizer, scheduler, folder: Path, step: int, losses: list[float], identity: dict):
    with atomic_directory(folder, overwrite=True) as tmp:
        tensors = {n: p.detach() for n, p in trainable_parameters(model).items()}
        tensors.update(_rng_states())
        save_tensors(tensors, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(
            json.dumps(
                {
                    "step": step,
                    "losses": losses,
                    "scheduler": scheduler.state_dict(),
                    "config": identity["config"],
                    "identity": identity,
                },
                indent=1,
                sort_keys=True,
            )
            + "\n"
        )
    for old in folder.parent.glob("step-*"):  # keep only the newest checkpoint
        if old != folder and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


CUDA_RNG = "__cuda_rng_state_{}__"


def _rng_states() -> dict[str, torch.Tensor]:
    """The CPU generator's state and every CUDA device's (LoRA dropout draws on the device)."""
    out = {"__rng_state__": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({CUDA_RNG.format(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def _set_rng_states(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Restore what `_rng_states` saved (popping it from `tensors`); a checkpoint of another number
    of CUDA devices cannot resume bit-exactly, so it is refused."""
    torch.set_rng_state(tensors.pop("__rng_state__"))
    cuda = [tensors.pop(CUDA_RNG.format(i)) for i in range(len(tensors)) if CUDA_RNG.format(i) in tensors]
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda) != have:
        raise ValueError(
            f"{folder}: saved the random state of {len(cuda)} CUDA device(s), this process has {have}; "
            f"resume on the same devices, or start afresh with --force"
        )
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def _restore(model, optimizer, scheduler, folder: Path):
    """Continue from checkpoint `folder` (its run identity already checked: `check_resumable`)."""
    state = json.loads((folder / "trainer_state.json").read_text())
    tensors = load_tensors(folder / "trainable.safetensors")
    _set_rng_states(tensors, folder)
    params = trainable_parameters(model)
    if set(tensors) != set(params):
        raise ValueError(
            f"{folder}: trainable weights do not match the model "
            f"(missing {sorted(set(params) - set(tensors))[:5]}, unexpected {sorted(set(tensors) - set(params))[:5]})"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), list(state["losses"])
