#!/usr/bin/env python
"""Benchmark NaiveMC composition of full fine-tune and LoRA modality models written to disk.

    python scripts/bench_compose.py --params 1e9 --models 4 [--full 2] [--rank 128]
                                    [--methods linear,ties,dare_ties,pcb] [--workdir /tmp]

Builds a base LLM (Llama-like shapes, float16) and `--models` single-modality models in mcomp's
format: the first `--full` of them full fine-tunes (`llm/`, sharded safetensors), the rest LoRA
adapters of rank `--rank` on every attention and MLP projection (peft format). Each backend then
runs twice in a fresh subprocess: `compose_checkpoint` (what `mcomp compose` does when an input is a
full fine-tune) and `merge_checkpoints` over the same LLM deltas (what `mcomp merge` does). The table
shows wall time and peak private memory (RssAnon sampled every 10 ms, as scripts/bench_merge.py) of
each, and the ratio compose / merge of the times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import GIB, build, llama_shapes, rss_anon, run_child  # noqa: E402

from mcomp.modalities import ORDER  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(shapes: dict) -> dict:
    vocab, hidden = shapes["model.embed_tokens.weight"]
    layers = sum(1 for k in shapes if k.endswith("input_layernorm.weight"))
    inter = shapes["model.layers.0.mlp.gate_proj.weight"][0]
    kv = shapes["model.layers.0.self_attn.k_proj.weight"][0]
    heads = hidden // 64
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv // 64,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }


def make_models(root: Path, shapes: dict, n: int, full: int, rank: int, seed: int) -> tuple[Path, list[Path]]:
    """The base folder and n mcomp model folders (the first `full` full fine-tunes, then LoRAs)."""
    import torch

    from mcomp import tiny
    from mcomp.checkpoint import CONFIG_NAME, MLLMConfig, llm_files_sha256
    from mcomp.io import save_tensors
    from mcomp.lora import LoraSpec
    from mcomp.modality import build_adapter
    from mcomp.peft_format import write_adapter

    dirs = build(root / "weights", shapes, full, "float16", seed)
    config = llama_config(shapes)
    base = root / "base"
    dirs[0].rename(base)
    (base / "config.json").write_text(json.dumps(config))
    tokenizer = tiny.build_tokenizer()
    models = []
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        folder = root / f"model{i}"
        folder.mkdir()
        fields = {}
        if i < full:
            dirs[i + 1].rename(folder / "llm")
            (folder / "llm" / "config.json").write_text(json.dumps(config))
            fields = {"llm": "llm", "llm_sha256": llm_files_sha256(folder / "llm")}
        else:
            pairs = {}
            for key, shape in shapes.items():
                module = key[: -len(".weight")]
                if module.split(".")[-1] in TARGETS:
                    out_f, in_f = shape
                    a = (torch.randn(rank, in_f, generator=g) / in_f**0.5).half()
                    b = (torch.randn(out_f, rank, generator=g) * 1e-3).half()
                    pairs[module] = (a, b)
            spec = LoraSpec(r=rank, alpha=2.0 * rank, target_modules=list(TARGETS))
            write_adapter(folder / "lora" / "text", pairs, spec=spec, base_model_name=str(base))
            fields = {"lora": {"spec": spec.to_dict(), "adapters": ["text"], "routes": {"text": [["text", 1.0]]}}}
        modality = ORDER[i]  # one model per modality: image, audio, video, point
        adapter = build_adapter(getattr(tiny, f"tiny_{modality}_adapter_config")(), config["hidden_size"])
        projector = {f"{modality}.{k}": v.half() for k, v in adapter.projector.state_dict().items()}
        encoder = {f"{modality}.{k}": v for k, v in adapter.encoder.state_dict().items()}
        save_tensors(projector, folder / "projectors.safetensors")
        save_tensors(encoder, folder / "encoders.safetensors")
        tokenizer.save_pretrained(folder)
        MLLMConfig(
            base_model=str(base),
            base_model_sha256="synthetic",
            base_model_config={"model_type": "llama", "hidden_size": config["hidden_size"]},
            adapters=[adapter.config.to_dict()],
            **fields,
        ).to_json_file(folder / CONFIG_NAME)
        models.append(folder)
    return base, models


def llm_inputs(models: list[Path]) -> list[str]:
    """What `mcomp merge` takes for the same deltas: each full fine-tune's llm/, each LoRA's text adapter."""
    return [str(m / "llm") if (m / "llm").is_dir() else str(m / "lora" / "text") for m in models]


def worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    method = "task_arithmetic" if a.method == "linear" else a.method
    t0 = time.perf_counter()
    if a.worker == "compose":
        from mcomp.compose_checkpoint import compose_checkpoint

        compose_checkpoint(dict(zip(ORDER, a.model)), out, merge=a.method, overwrite=True)
    else:
        from mcomp.merge import merge_checkpoints

        n = len(a.model)
        weights = [1.0 / n] * n if a.method == "linear" else None
        merge_checkpoints(a.base, llm_inputs([Path(m) for m in a.model]), out, method, force=True, weights=weights)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    print(json.dumps({"seconds": seconds, "final_anon": rss_anon(os.getpid())}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1e9, help="LLM parameters (default 1e9)")
    ap.add_argument("--models", type=int, default=4, help="modality models, at most 4 (default 4)")
    ap.add_argument("--full", type=int, default=2, help="how many of them are full fine-tunes (default 2)")
    ap.add_argument("--rank", type=int, default=128, help="LoRA rank of the others (default 128)")
    ap.add_argument("--methods", default="linear,ties,dare_ties,pcb")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--model", action="append", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0
    root = Path(tempfile.mkdtemp(prefix="mcomp-bench-compose-", dir=a.workdir))
    try:
        shapes = llama_shapes(a.params)
        t0 = time.perf_counter()
        base, models = make_models(root, shapes, a.models, a.full, a.rank, a.seed)
        params = sum(math.prod(s) for s in shapes.values())
        print(
            f"{a.models} models of {params / 1e9:.2f}B parameters (float16): {a.full} full fine-tunes, "
            f"{a.models - a.full} LoRA r={a.rank}; built in {time.perf_counter() - t0:.0f} s"
        )
        common = ["--base", str(base), "--out", str(root / "out")] + [x for m in models for x in ("--model", str(m))]
        common += ["--threads", str(a.threads)]
        print("| backend | compose s | merge s | compose / merge | compose peak private GiB | merge peak private GiB |")
        print("|---|---|---|---|---|---|")
        for method in a.methods.split(","):
            comp = run_child(["--worker", "compose", "--method", method, *common], __file__)
            merge = run_child(["--worker", "merge", "--method", method, *common], __file__)
            print(
                f"| {method} | {comp['seconds']:.1f} | {merge['seconds']:.1f} | "
                f"{comp['seconds'] / merge['seconds']:.2f} | {comp['peak_anon'] / GIB:.2f} | "
                f"{merge['peak_anon'] / GIB:.2f} |",
                flush=True,
            )
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
