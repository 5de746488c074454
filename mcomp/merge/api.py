"""The public merge functions: state dicts in memory, task vectors (both from `memory`), and
checkpoints on disk."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mcomp.io import atomic_directory
from mcomp.merge.lora import LoraSink, LoraSource, load_lora, lora_target_keys
from mcomp.merge.memory import (  # noqa: F401  (re-exported: the public merge functions live here)
    DTYPE_BY_NAME,
    MemorySink,
    _engine_options,
    merge_state_dicts,
    merge_task_vectors,
    resolve_dtype,
)
from mcomp.merge.sources import SafetensorsCheckpoint, Source
from mcomp.merge.streaming import MergeEngine, MergeReport, Sink
from mcomp.merge.writer import ShardedWriter, parse_size

if TYPE_CHECKING:
    from mcomp.output_record import OutputRecord

logger = logging.getLogger(__name__)

# Files copied from the base model directory so the output loads like the base.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
AUX_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "preprocessor_config.json")


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


def open_model(path: str | os.PathLike, base: Source | None = None, name: str | None = None) -> Source:
    """A checkpoint directory/file, or a peft LoRA adapter directory (applied to `base`)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
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


def merge_checkpoints(
    base: str | os.PathLike,
    models: list[str | os.PathLike],
    out: str | os.PathLike,
    method: str = "task_arithmetic",
    *,
    force: bool = False,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    chunk_elems: int | None = None,
    inmemory_elems: int | None = 0,
    sample_size: int | None = None,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    lora_rank: int | None = None,
    record: OutputRecord | None = None,
    **params: Any,
) -> MergeReport:
    """Merge checkpoints on disk into `out` (sharded safetensors + index, written atomically).

    `models` may be checkpoints (safetensors dirs/files) or peft LoRA adapter directories.
    When all are adapters, only their target weights are merged (in ΔW space); with
    `lora_rank` the merged ΔW is re-factorised into a peft adapter of that rank instead of
    being folded into the base. `out` must not exist unless `force`. `record`
    (`mcomp.output_record.OutputRecord`): the recipe and model card written with the output.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"output directory {out} already exists (use --force to replace it)")
    out_dtype = resolve_dtype(dtype)
    base_src = SafetensorsCheckpoint(base, name=str(base))
    srcs = [open_model(m, base_src) for m in models]
    all_lora = all(isinstance(s, LoraSource) for s in srcs)
    keys = lora_target_keys([s.adapter for s in srcs]) if all_lora else None
    if lora_rank is not None and not all_lora:
        raise ValueError("lora_rank (re-factorisation to a LoRA) needs every model to be a LoRA adapter")
    engine = MergeEngine(
        base_src,
        srcs,
        method,
        keys=keys,
        device=device,
        progress=progress,
        **_engine_options(chunk_elems, inmemory_elems, sample_size),
        **params,
    )
    try:
        with atomic_directory(out, overwrite=force, inputs=[base, *models]) as tmp:
            if lora_rank is not None:
                sink = LoraSink(base_src.infos, [s.adapter for s in srcs], lora_rank)
                report = engine.run(sink)
                sink.save(tmp)
                report.stats.append({"lora_reconstruction": sink.errors, "lora_total_error": sink.total_error})
            else:
                writer = ShardedWriter(
                    tmp,
                    engine.layout(out_dtype),
                    parse_size(max_shard_size),
                    metadata={"merge_method": engine.method_cls.name},
                    origin=f"base {base}, models {', '.join(map(str, models))}",
                )
                try:
                    report = engine.run(CheckpointSink(writer, out_dtype))
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
                copy_aux_files(Path(base), tmp, out_dtype)
            if record is not None:
                record.write(tmp, report.card_facts())
    finally:
        for s in [base_src, *srcs]:
            s.close()
    return report
