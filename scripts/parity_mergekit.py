#!/usr/bin/env python
"""Run mergekit's own example configs through mergekit and `mcomp merge` and compare every output tensor.

    PYTHONPATH=MERGEKIT_DIR python scripts/parity_mergekit.py [--mergekit-path MERGEKIT_DIR] [--mergekit-repo REPO]

mergekit's examples (`examples/*.yml`) are read from a clone of its repository when `--mergekit-repo` names
one, else from the copies in tests/data/mergekit_examples/. Their model names become small local checkpoints:
random Llama (`LlamaForCausalLM`'s config and tensor names, 40 layers as the 13B models the examples name,
hidden size 32), in the example's dtype; the example's `base_model` is the shared initialisation, every other
model the same plus seeded noise. A few configs of this script's own (rows `extra: ...`) cover what the
examples do not: `model+lora` (a peft LoRA made with peft), breadcrumbs, model_stock, task arithmetic with
filters and `lambda`, passthrough with `scale`.

mergekit runs in a subprocess (`run_merge`, with `--mergekit-path` on PYTHONPATH), mcomp through its command
(`mcomp merge`). Tensors are equal when names, shapes and dtypes match and every value is within one rounding
of the output dtype (|a − b| ≤ eps·max(|a|, |b|), eps of float16 2⁻¹⁰). Prints a Markdown table; exit status 1
if any compared config differs. Deterministic: every weight is seeded.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
COPIES = ROOT / "tests" / "data" / "mergekit_examples"
EXAMPLES = ("arcee_fusion", "bio-merge", "gradient-slerp", "linear", "orcamini-platy-44layer", "ties")
LAYERS = 40
EXTRAS = {
    "extra: model+lora ties": """
models:
  - {model: tuned-a+lora-a, parameters: {weight: 0.6, density: 0.4}}
  - {model: tuned-b, parameters: {weight: [1, 0.2], density: [0.9, 0.3]}}
merge_method: ties
base_model: base
dtype: float16
""",
    "extra: breadcrumbs_ties": """
models:
  - {model: tuned-a, parameters: {weight: 0.7, density: 0.8, gamma: 0.02}}
  - {model: tuned-b, parameters: {weight: 0.5, density: [0.6, 0.9], gamma: 0.05}}
merge_method: breadcrumbs_ties
base_model: base
parameters: {lambda: 1.3, normalize: true}
dtype: float16
""",
    "extra: task_arithmetic filters": """
models:
  - model: tuned-a
    parameters:
      weight: [{filter: self_attn, value: [0.2, 1.0]}, {filter: mlp, value: 0.4}, {value: 0.8}]
  - {model: tuned-b, parameters: {weight: 0.5}}
merge_method: task_arithmetic
base_model: base
parameters: {lambda: 0.9}
dtype: float16
""",
    "extra: model_stock": """
models: [{model: tuned-a}, {model: tuned-b}, {model: tuned-c}]
merge_method: model_stock
base_model: base
dtype: float16
""",
    "extra: passthrough scale": """
slices:
  - sources: [{model: tuned-a, layer_range: [0, 8]}]
  - sources:
      - model: tuned-b
        layer_range: [30, 40]
        parameters: {scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: 0.25}, {value: 1.0}]}
merge_method: passthrough
dtype: bfloat16
""",
}


def read_example(name: str, repo: str | None = None) -> tuple[str, str]:
    """(YAML text, where it came from): examples/<name>.yml at the HEAD of mergekit's repository `repo`, else
    the copy under tests/data."""
    if repo:
        got = subprocess.run(["git", "-C", repo, "show", f"HEAD:examples/{name}.yml"], capture_output=True, text=True)
        if got.returncode == 0:
            return got.stdout, "mergekit repository"
    return (COPIES / f"{name}.yml").read_text(encoding="utf-8"), "tests/data copy"


def model_names(config: dict) -> list[str]:
    """Every model the config names ('a+b' gives a and b), in order of appearance."""
    names = []

    def add(text):
        if isinstance(text, str):
            names.extend(part for part in text.split("+") if part not in names)

    add(config.get("base_model"))
    for entry in config.get("models") or []:
        add(entry["model"] if isinstance(entry, dict) else entry)
    for sl in config.get("slices") or []:
        add(sl.get("base_model"))
        for src in sl["sources"]:
            add(src["model"])
    return names


def rewrite(config: dict, paths: dict[str, str]) -> dict:
    """The config with every model name replaced by its local path ('model+lora' part by part)."""
    out = copy.deepcopy(config)

    def local(text):
        return "+".join(paths[part] for part in text.split("+"))

    if out.get("base_model"):
        out["base_model"] = local(out["base_model"])
    for i, entry in enumerate(out.get("models") or []):
        if isinstance(entry, dict):
            entry["model"] = local(entry["model"])
        else:
            out["models"][i] = local(entry)
    for sl in out.get("slices") or []:
        if sl.get("base_model"):
            sl["base_model"] = local(sl["base_model"])
        for src in sl["sources"]:
            src["model"] = local(src["model"])
    return out


def llama_config(dtype: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        torch_dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


def build_models(root: Path, names: list[str], base: str | None, dtype: str) -> dict[str, str]:
    """Local checkpoints for `names`: `base` is the seeded initialisation, each other model (a name starting
    with 'lora' is a peft adapter instead) the initialisation plus its own seeded noise."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    config = llama_config(dtype)
    torch.manual_seed(0)
    init = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    paths = {}
    for index, name in enumerate(names):
        directory = root / name.replace("/", "--")
        paths[name] = str(directory)
        if name.split("/")[-1].startswith("lora"):
            make_lora(directory, config, seed=100 + index)
            continue
        g = torch.Generator().manual_seed(1000 + index)
        tensors = {
            k: (v if name == base else v + 0.01 * torch.randn(v.shape, generator=g)).to(getattr(torch, dtype))
            for k, v in init.items()
        }
        directory.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
        config.save_pretrained(directory)
    return paths


def make_lora(directory: Path, config, seed: int) -> None:
    """A real peft LoRA adapter (q_proj, v_proj; rank 4) with random A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with torch.no_grad():  # peft's random B is tiny next to the weights; make the update visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(50)
    model.save_pretrained(directory)


def run_mergekit(config: Path, out: Path, mergekit_path: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [mergekit_path, os.environ.get("PYTHONPATH")]))}
    got = subprocess.run(
        [sys.executable, __file__, "--worker", str(config), str(out)], env=env, capture_output=True, text=True
    )
    if got.returncode != 0:
        raise RuntimeError(f"mergekit failed on {config}:\n{got.stderr[-3000:]}")


def worker(config: str, out: str) -> None:
    """In the subprocess: mergekit's own run_merge."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    options = MergeOptions(
        copy_tokenizer=False,
        write_model_card=False,
        quiet=True,
        random_seed=0,
        lora_merge_cache=str(Path(out).parent / "lora-cache"),
    )
    run_merge(MergeConfiguration.model_validate(data), out, options=options)


def run_mcomp(config: Path, out: Path) -> None:
    from mcomp.cli import main

    code = main(["merge", str(config), "--out", str(out), "--no-progress"])
    if code != 0:
        raise RuntimeError(f"mcomp merge failed on {config} (exit {code})")


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Names, shapes, dtypes, and the largest |a − b| against one rounding of the output dtype."""
    problems = []
    if set(a) != set(b):
        problems.append(
            f"names differ: only mergekit {sorted(set(a) - set(b))[:3]}, only mcomp {sorted(set(b) - set(a))[:3]}"
        )
    worst, worst_rel, unequal = 0.0, 0.0, 0
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{name}: {list(x.shape)} {x.dtype} vs {list(y.shape)} {y.dtype}")
            continue
        x, y = x.double(), y.double()
        diff = (x - y).abs()
        scale = torch.maximum(x.abs(), y.abs())
        eps = torch.finfo(a[name].dtype).eps
        unequal += int((diff > eps * scale + torch.finfo(a[name].dtype).smallest_normal * eps).sum())
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        rel = diff / scale.clamp(min=torch.finfo(a[name].dtype).tiny)
        worst_rel = max(worst_rel, float(rel.max()) if rel.numel() else 0.0)
    if unequal:
        problems.append(f"{unequal} value(s) beyond one rounding")
    return {"tensors": len(set(a) & set(b)), "max_abs": worst, "max_rel": worst_rel, "problems": problems}


def run_config(label: str, config: dict, work: Path, mergekit_path: str) -> dict:
    """Build the inputs, merge with both tools, compare: one table row."""
    method = config["merge_method"]
    from mcomp.merge.mergekit_schema import METHODS

    if method not in METHODS:
        return {"config": label, "method": method, "note": "not in mcomp"}
    dtype = config.get("dtype") or "float16"
    work.mkdir(parents=True)
    names = model_names(config)
    paths = build_models(work / "models", names, config.get("base_model"), dtype)
    local = rewrite(config, paths)
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(local, sort_keys=False), encoding="utf-8")
    run_mergekit(path, work / "mergekit", mergekit_path)
    run_mcomp(path, work / "mcomp")
    return {"config": label, "method": method, **compare(load_dir(work / "mergekit"), load_dir(work / "mcomp"))}


def all_configs(repo: str | None = None) -> list[tuple[str, dict]]:
    out = []
    for name in EXAMPLES:
        text, _ = read_example(name, repo)
        out.append((f"{name}.yml", yaml.safe_load(text)))
    for label, text in EXTRAS.items():
        out.append((label, yaml.safe_load(text)))
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| config | method | tensors | max abs. difference | max rel. difference | equal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("note"):
            lines.append(f"| {r['config']} | {r['method']} | – | – | – | {r['note']} |")
            continue
        equal = "yes" if not r["problems"] else "no: " + "; ".join(r["problems"])
        lines.append(
            f"| {r['config']} | {r['method']} | {r['tensors']} | {r['max_abs']:.3g} | {r['max_rel']:.3g} | {equal} |"
        )
    return "\n".join(lines)


def default_mergekit_path() -> str:
    """The directory that holds the importable mergekit package (give --mergekit-path when none is)."""
    try:
        import mergekit
    except ImportError:
        raise SystemExit("mergekit is not importable: put it on PYTHONPATH or give --mergekit-path") from None
    return str(Path(mergekit.__file__).resolve().parents[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit-path", default=None, help="directory holding the mergekit package")
    parser.add_argument(
        "--mergekit-repo", help="a clone of mergekit's repository to read examples/*.yml from (default: tests/data)"
    )
    parser.add_argument("--keep", help="keep the checkpoints and outputs in this directory")
    parser.add_argument("--only", help="comma-separated config labels to run (default: all)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.worker:
        worker(*a.worker)
        return 0
    mergekit_path = a.mergekit_path or default_mergekit_path()
    torch.set_num_threads(1)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="parity-mergekit-"))
    rows = []
    try:
        for i, (label, config) in enumerate(all_configs(a.mergekit_repo)):
            if a.only and label not in a.only.split(","):
                continue
            rows.append(run_config(label, config, work / f"{i:02d}", mergekit_path))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    return 1 if any(r.get("problems") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
