"""Running a `MergePlan` (a mergekit config, `mcomp.merge.mergekit_plan`): the merge engine per run of output
tensors that share their input models, each tensor with its own parameters, into one sharded checkpoint.

Inputs are read as mergekit reads them: cast to the config's `dtype` (mergekit's compute dtype) when given;
`model+lora` is the model with the LoRA folded in and rounded to the model's dtype, as peft's
`merge_and_unload` leaves it (W + s·B·A computed in float32, one rounding). The output dtype is `out_dtype`,
else `dtype`, else the inputs'. `passthrough` copies its tensor (times its `scale`, in the compute dtype).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mcomp.io import atomic_directory
from mcomp.merge.api import TOKENIZER_FILES, CheckpointSink, copy_aux_files
from mcomp.merge.lora import LoraAdapter, load_lora
from mcomp.merge.memory import _engine_options, resolve_dtype
from mcomp.merge.mergekit_plan import MergePlan, PlannedTensor
from mcomp.merge.mergekit_schema import ModelRef, is_adapter_dir
from mcomp.merge.methods.mergekit_family import GTA_METHODS, MergekitLinear, MergekitModelStock
from mcomp.merge.sources import SafetensorsCheckpoint, Source, TensorInfo
from mcomp.merge.streaming import MergeEngine, MergeReport
from mcomp.merge.writer import ShardedWriter, parse_size

if TYPE_CHECKING:
    from mcomp.output_record import OutputRecord

logger = logging.getLogger(__name__)


class LoraApplied(Source):
    """A model with a peft LoRA folded in: W + s·B·A in float32, rounded to W's dtype (peft's merge_and_unload)."""

    def __init__(self, model: Source, adapter: LoraAdapter, name: str):
        self.model, self.adapter, self.name = model, adapter, name
        self.infos = model.infos
        for key, m in adapter.modules.items():
            if key not in model.infos:
                raise ValueError(f"{name}: the LoRA's target weight {key!r} is not in the model")
            want = (m.A.shape[1], m.B.shape[0]) if m.fan_in_fan_out else (m.B.shape[0], m.A.shape[1])
            if tuple(model.infos[key].shape) != want:
                raise ValueError(
                    f"{name}: the LoRA's ΔW of {key!r} is {list(want)}, the weight {list(model.infos[key].shape)}"
                )

    def read(self, key, start, stop):
        m = self.adapter.modules.get(key)
        if m is None:
            return self.model.read(key, start, stop)
        cols = self.infos[key].shape[1]
        r0, r1 = start // cols, -(-stop // cols)
        delta = m.delta_rows(r0, r1).reshape(-1)[start - r0 * cols : stop - r0 * cols]
        return (self.model.read(key, start, stop).float() + delta).to(self.infos[key].dtype)

    def close(self):
        self.model.close()


class PlanSource(Source):
    """A model under the plan's output names (output name -> its input tensor name), cast to `dtype`."""

    def __init__(self, source: Source, names: dict[str, str], dtype: torch.dtype | None):
        self.source, self.names, self.name = source, names, source.name
        self.infos = {
            out: TensorInfo(source.infos[inp].shape, dtype or source.infos[inp].dtype) for out, inp in names.items()
        }

    def read(self, key, start, stop):
        return self.source.read(self.names[key], start, stop).to(self.infos[key].dtype)

    def view(self, key, start, stop):
        return self.source.view(self.names[key], start, stop).to(self.infos[key].dtype)


class ZeroModel(Source):
    """All zeros with given names, shapes and dtypes: the base under mergekit's `linear` (τ_i = θ_i)."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.name, self.infos = "zero base", dict(infos)

    def read(self, key, start, stop):
        return torch.zeros(stop - start, dtype=self.infos[key].dtype)


def open_ref(ref: ModelRef) -> Source:
    model = SafetensorsCheckpoint(ref.model, name=ref.model)
    if ref.lora is None:
        return model
    if not is_adapter_dir(ref.lora):
        raise ValueError(f"{ref}: {ref.lora!r} is not a peft LoRA adapter directory (no adapter_config.json)")
    return LoraApplied(model, load_lora(ref.lora), name=str(ref))


def tensor_names(path: str) -> list[str]:
    """A checkpoint's tensor names in storage order, from its headers."""
    checkpoint = SafetensorsCheckpoint(path, name=path)
    try:
        return checkpoint.storage_order()
    finally:
        checkpoint.close()


def check_vocabularies(donor: ModelRef, models: list[ModelRef]) -> None:
    """`tokenizer_source`: every model's vocabulary must be the donor's (mergekit would re-map embedding rows
    otherwise, which mcomp does not do)."""
    from transformers import AutoTokenizer

    def vocabulary(ref: ModelRef) -> dict[str, int]:
        try:
            return AutoTokenizer.from_pretrained(ref.model, trust_remote_code=False).get_vocab()
        except (OSError, ValueError) as err:
            raise ValueError(f"tokenizer_source: cannot read the tokenizer of {ref.model!r}: {err}") from None

    wanted = vocabulary(donor)
    for ref in models:
        if not ref.same_as(donor) and vocabulary(ref) != wanted:  # the donor's own is read once
            raise ValueError(
                f"tokenizer_source: {ref.model!r} has a vocabulary other than {donor.model!r}'s; re-mapping "
                "embedding rows between vocabularies is not supported"
            )


def merge_config(cfg: Any, out: str | os.PathLike, *, dtype: str | None = None, **options: Any) -> MergeReport:
    """Merge a `MergeConfig` read as mergekit reads it into `out`; `dtype` (the command's --dtype) overrides
    the output dtype. `options`: those of `run_plan`."""
    from mcomp.merge.mergekit_plan import Planner

    plan = Planner(cfg, cfg.source, tensor_names).plan()
    donor = None
    if cfg.tokenizer_source is not None:
        base = ModelRef.parse(cfg.base_model, cfg.source) if cfg.base_model else None
        if cfg.tokenizer_source == "base" and base is None:
            raise ValueError(f"{cfg.source}: tokenizer_source 'base' needs a base_model")
        donor = base if cfg.tokenizer_source == "base" else ModelRef.parse(cfg.tokenizer_source, cfg.source)
        check_vocabularies(donor, list(dict.fromkeys(ref for t in plan.tensors for ref, _ in t.inputs)))
    return run_plan(plan, out, dtype=cfg.dtype, out_dtype=dtype or cfg.out_dtype, tokenizer_donor=donor, **options)


def engine_params(method: str, t: PlannedTensor, compute_dtype: torch.dtype) -> dict[str, Any]:
    """The engine method's parameters for one tensor from its resolved mergekit parameters."""
    s, per = t.shared, t.per_input
    if method in GTA_METHODS:
        models = [i for i in range(len(t.inputs)) if i != t.base]
        out = {
            "weights": [per["weight"][i] for i in models],
            "densities": [per["density"][i] for i in models],
            "normalize": s["normalize"],
            "rescale": s["rescale"],
            "int8_mask": s["int8_mask"],
            "scale": s["lambda"],
            "compute_dtype": str(compute_dtype).replace("torch.", ""),
        }
        for name, key in (("gamma", "gammas"), ("epsilon", "epsilons")):
            if name in per:
                out[key] = [per[name][i] for i in models]
        return out
    if method == "linear":
        return {"weights": per["weight"], "normalize": s["normalize"]}
    if method == "slerp":
        return {"t": s["t"]}
    return {"filter_wise": s["filter_wise"], "compute_dtype": str(compute_dtype).replace("torch.", "")}  # model_stock


def run_plan(
    plan: MergePlan,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    out_dtype: str | None = None,
    tokenizer_donor: ModelRef | None = None,
    force: bool = False,
    device: str = "cpu",
    chunk_elems: int | None = None,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    record: OutputRecord | None = None,
) -> MergeReport:
    """Merge the plan into `out` (sharded safetensors + index, config and tokenizer files, written atomically)."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output directory {out} already exists (use --force to replace it)")
    t0 = time.perf_counter()
    cast, final = resolve_dtype(dtype), resolve_dtype(out_dtype)
    refs = list(dict.fromkeys(ref for t in plan.tensors for ref, _ in t.inputs))
    sources = {ref: open_ref(ref) for ref in refs}
    report = MergeReport(method=plan.method, params={"tensors": len(plan.tensors)})
    try:
        steps = [_step(plan.method, run, sources, cast, device, chunk_elems, progress) for run in _runs(plan.tensors)]
        layout = [item for step in steps for item in step.layout(final)]
        inputs = [r.model for r in refs] + [r.lora for r in refs if r.lora]
        with atomic_directory(out, overwrite=force, inputs=inputs) as tmp:
            writer = ShardedWriter(
                tmp,
                layout,
                parse_size(max_shard_size),
                metadata={"merge_method": plan.method},
                origin=", ".join(map(str, refs)),
            )
            try:
                sink = CheckpointSink(writer, final)
                for step in steps:
                    step.run(sink, report)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            _write_aux(plan, tmp, final or cast, tokenizer_donor)
            report.seconds = time.perf_counter() - t0
            if record is not None:
                record.write(tmp, report.card_facts())
    finally:
        for s in sources.values():
            s.close()
    logger.info("%s merge (mergekit's reading): %d tensor(s), %.1f s", plan.method, len(plan.tensors), report.seconds)
    return report


def _runs(tensors: list[PlannedTensor]) -> list[list[PlannedTensor]]:
    """Consecutive tensors with the same input models and base: one engine each."""
    runs: list[list[PlannedTensor]] = []
    for t in tensors:
        key = (tuple(ref for ref, _ in t.inputs), t.base)
        if runs and (tuple(ref for ref, _ in runs[-1][0].inputs), runs[-1][0].base) == key:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


class _Copies:
    """passthrough: each tensor copied from its one input (times its `scale`)."""

    def __init__(self, tensors: list[PlannedTensor], sources: dict[ModelRef, Source], cast: torch.dtype | None):
        self.tensors, self.sources, self.cast = tensors, sources, cast

    def layout(self, final):
        out = []
        for t in self.tensors:
            ref, name = t.inputs[0]
            info = self.sources[ref].infos[name]
            out.append((t.name, TensorInfo(info.shape, final or self.cast or info.dtype)))
        return out

    def run(self, sink, report):
        for (name, info), t in zip(self.layout(sink.out_dtype), self.tensors):
            ref, in_name = t.inputs[0]
            src = self.sources[ref]
            value = src.read(in_name, 0, src.infos[in_name].numel).to(self.cast or src.infos[in_name].dtype)
            scale = t.per_input["scale"][0]
            sink.copy(name, (value if scale is None else value * scale).to(info.dtype))
        report.passes = max(report.passes, 1)


class _Merge:
    """One engine over a run of tensors sharing their inputs, each tensor with its own parameters."""

    def __init__(self, method, tensors, sources, cast, device, chunk_elems, progress):
        first = tensors[0]
        views = [
            PlanSource(sources[ref], {t.name: t.inputs[i][1] for t in tensors}, cast)
            for i, (ref, _) in enumerate(first.inputs)
        ]
        if method == "linear":
            base, models = ZeroModel(views[0].infos), views
        else:
            base, models = views[first.base], [v for i, v in enumerate(views) if i != first.base]
        dtype = cast or views[0].infos[first.name].dtype
        cls = GTA_METHODS.get(method) or {"linear": MergekitLinear, "model_stock": MergekitModelStock}.get(
            method, method
        )
        self.engine = MergeEngine(
            base,
            models,
            cls,
            tensor_params={t.name: engine_params(method, t, dtype) for t in tensors},
            device=device,
            progress=progress,
            **_engine_options(chunk_elems, 0, None),
        )

    def layout(self, final):
        return self.engine.layout(final)

    def run(self, sink, report):
        done = self.engine.run(sink)
        report.passes = max(report.passes, done.passes)
        report.groups += done.groups
        report.stats.extend(done.stats)


def _step(method, tensors, sources, cast, device, chunk_elems, progress):
    if method == "passthrough":
        return _Copies(tensors, sources, cast)
    return _Merge(method, tensors, sources, cast, device, chunk_elems, progress)


def _write_aux(plan: MergePlan, out: Path, dtype: torch.dtype | None, tokenizer_donor: ModelRef | None) -> None:
    """config.json and tokenizer files from the donor (the base, else the first model), the layer count of a
    sliced merge, the tokenizer of `tokenizer_source`."""
    copy_aux_files(Path(plan.donor.model), out, dtype)
    config = out / "config.json"
    if plan.num_layers is not None and config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        target = data["text_config"] if "num_hidden_layers" not in data and "text_config" in data else data
        target["num_hidden_layers"] = plan.num_layers
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer_donor is not None:
        for name in TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
            src = Path(tokenizer_donor.model) / name
            if src.is_file():  # every tokenizer file the donor's: no mix of two tokenizers
                shutil.copy2(src, out / name)
