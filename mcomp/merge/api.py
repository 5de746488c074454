"""The public merge functions: state dicts in memory, task vectors, and checkpoints on disk."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mcomp.io import atomic_directory
from mcomp.merge.registry import Segment
from mcomp.merge.sources import MemorySource, SafetensorsCheckpoint, Source, ZeroSource
from mcomp.merge.streaming import DEFAULT_CHUNK, DEFAULT_SAMPLE, MergeEngine, MergeReport, Sink
from mcomp.merge.writer import ShardedWriter, parse_size

logger = logging.getLogger(__name__)

INMEMORY_ELEMS = 1 << 24
DTYPE_BY_NAME = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
# Files copied from the base model directory so the output loads like the base.
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
             "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_BY_NAME:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPE_BY_NAME))}")
    return DTYPE_BY_NAME[dtype]


class MemorySink(Sink):
    """Collects the output in memory: θ (base + delta, cast) or the merged delta itself."""

    def __init__(self, infos, out_dtype: torch.dtype | None = None, delta: bool = False):
        self.infos = infos
        self.out_dtype = out_dtype
        self.delta = delta
        self.out: dict[str, torch.Tensor] = {}

    def copy(self, name, tensor):
        self.out[name] = tensor.clone()

    def put(self, seg: Segment, base, delta):
        info = self.infos[seg.name]
        if seg.name not in self.out:
            dtype = torch.float32 if self.delta else (self.out_dtype or info.dtype)
            self.out[seg.name] = torch.empty(info.shape, dtype=dtype)
        value = delta if self.delta else base + delta
        self.out[seg.name].view(-1)[seg.start:seg.stop] = value.to(self.out[seg.name].dtype).cpu()


class CheckpointSink(Sink):
    """Streams θ = θ0 + delta, cast to the output dtype, into a ShardedWriter."""

    def __init__(self, writer: ShardedWriter, out_dtype: torch.dtype | None):
        self.writer = writer
        self.out_dtype = out_dtype

    def copy(self, name, tensor):
        self.writer.write(name, tensor.reshape(-1))

    def put(self, seg, base, delta):
        dtype = self.out_dtype or self.writer._infos[seg.name].dtype
        self.writer.write(seg.name, torch.add(base, delta).to(dtype).cpu())


def _engine_options(chunk_elems, inmemory_elems, sample_size) -> dict:
    return {"chunk_elems": chunk_elems or DEFAULT_CHUNK,
            "inmemory_elems": INMEMORY_ELEMS if inmemory_elems is None else inmemory_elems,
            "sample_size": DEFAULT_SAMPLE if sample_size is None else sample_size}


def merge_state_dicts(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]],
                      method: str = "task_arithmetic", *, device: str = "cpu", dtype: str | torch.dtype | None = None,
                      chunk_elems: int | None = None, inmemory_elems: int | None = None, sample_size: int | None = None,
                      **params: Any) -> dict[str, torch.Tensor]:
    """Merge fine-tuned state dicts onto `base`; returns θ (base included) in the base's dtypes.

    `params` are the method's (validated) parameters: weights, scale, density, ratio, clip,
    inter, scope, sign, rescale, seed. Tensors that are not floating point are copied from
    the base. The engine options only trade memory for passes; results do not change.
    """
    src = MemorySource(base, "base")
    srcs = [MemorySource(m, f"model {i}") for i, m in enumerate(models)]
    engine = MergeEngine(src, srcs, method, device=device, **_engine_options(chunk_elems, inmemory_elems, sample_size),
                         **params)
    sink = MemorySink(src.infos, resolve_dtype(dtype))
    engine.run(sink)
    return {k: sink.out[k] for k in base}


def merge_task_vectors(deltas: list[dict[str, torch.Tensor]], method: str = "task_arithmetic", *, device: str = "cpu",
                       chunk_elems: int | None = None, inmemory_elems: int | None = None,
                       sample_size: int | None = None, **params: Any) -> dict[str, torch.Tensor]:
    """Merge task vectors τ_i directly (deltas in, merged float32 delta out, scale included).

    Same semantics as `merge_state_dicts` with θ0 = 0; used for LoRA, whose task vectors are
    ΔW = (α/r)·B·A. All deltas must have the same keys and shapes.
    """
    if not deltas:
        raise ValueError("need at least one task vector to merge")
    srcs = [MemorySource({k: v.float() for k, v in d.items()}, f"task vector {i}") for i, d in enumerate(deltas)]
    base = ZeroSource(srcs[0].infos)
    engine = MergeEngine(base, srcs, method, device=device, **_engine_options(chunk_elems, inmemory_elems, sample_size),
                         **params)
    sink = MemorySink(base.infos, delta=True)
    engine.run(sink)
    return {k: sink.out[k] for k in deltas[0]}


def open_model(path: str | os.PathLike, base: Source | None = None, name: str | None = None) -> Source:
    """A checkpoint directory/file, or a peft LoRA adapter directory (applied to `base`)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from mcomp.merge.lora import LoraSource, load_lora

        if base is None:
            raise ValueError(f"{path}: a LoRA adapter needs a base model")
        return LoraSource(base, load_lora(path), name=name or str(path))
    return SafetensorsCheckpoint(path, name=name or str(path))


def copy_aux_files(base_dir: Path, out_dir: Path, out_dtype: torch.dtype | None) -> None:
    """Copy config, generation config and tokenizer files so the output loads like the base."""
    if not base_dir.is_dir():
        return
    for fname in AUX_FILES:
        src = base_dir / fname
        if src.is_file():
            shutil.copy2(src, out_dir / fname)
    cfg = out_dir / "config.json"
    if out_dtype is not None and cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        name = str(out_dtype).replace("torch.", "")
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = name
        cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def merge_checkpoints(base: str | os.PathLike, models: list[str | os.PathLike], out: str | os.PathLike,
                      method: str = "task_arithmetic", *, force: bool = False, device: str = "cpu",
                      dtype: str | torch.dtype | None = None, chunk_elems: int | None = None,
                      inmemory_elems: int | None = 0, sample_size: int | None = None,
                      max_shard_size: str | int = "5GB", progress: bool = False, lora_rank: int | None = None,
                      **params: Any) -> MergeReport:
    """Merge checkpoints on disk into `out` (sharded safetensors + index, written atomically).

    `models` may be checkpoints (safetensors dirs/files) or peft LoRA adapter directories.
    When all are adapters, only their target weights are merged (in ΔW space); with
    `lora_rank` the merged ΔW is re-factorised into a peft adapter of that rank instead of
    being folded into the base. `out` must not exist unless `force`.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output directory {out} already exists (use --force to replace it)")
    out_dtype = resolve_dtype(dtype)
    base_src = SafetensorsCheckpoint(base, name=str(base))
    srcs = [open_model(m, base_src) for m in models]
    from mcomp.merge.lora import LoraSource, LoraSink, lora_target_keys

    all_lora = all(isinstance(s, LoraSource) for s in srcs)
    keys = lora_target_keys([s.adapter for s in srcs]) if all_lora else None
    if lora_rank is not None and not all_lora:
        raise ValueError("lora_rank (re-factorisation to a LoRA) needs every model to be a LoRA adapter")
    engine = MergeEngine(base_src, srcs, method, keys=keys, device=device, progress=progress,
                         **_engine_options(chunk_elems, inmemory_elems, sample_size), **params)
    try:
        with atomic_directory(out, overwrite=force, inputs=[base, *models]) as tmp:
            if lora_rank is not None:
                sink = LoraSink(base_src.infos, [s.adapter for s in srcs], lora_rank)
                report = engine.run(sink)
                sink.save(tmp)
                report.stats.append({"lora_reconstruction": sink.errors, "lora_total_error": sink.total_error})
            else:
                writer = ShardedWriter(tmp, engine.layout(out_dtype), parse_size(max_shard_size),
                                       metadata={"merge_method": engine.method_cls.name},
                                       origin=f"base {base}, models {', '.join(map(str, models))}")
                try:
                    report = engine.run(CheckpointSink(writer, out_dtype))
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
                copy_aux_files(Path(base), tmp, out_dtype)
    finally:
        for s in [base_src, *srcs]:
            s.close()
    return report
