#!/usr/bin/env python
"""Benchmark the streaming merge engine on synthetic checkpoints of realistic shapes.

    python scripts/bench_merge.py --params 1e9 --models 3 --dtype float16
                                  [--methods task_arithmetic,ties,pcb] [--repeat 3] [--device cuda]
    python scripts/bench_merge.py --methods task_arithmetic,tsv,tsv:svd=lowrank,iso_cts,iso_cts:svd=lowrank
    python scripts/bench_merge.py --lora-rank 16 --methods task_arithmetic,ties,knots,knots:factors=false

A method may carry parameters, `name:key=value;key=value` (values parsed as JSON where they parse).
Where a method runs both with its exact SVDs and with `svd=lowrank` (or KnOTS both from LoRA factors and
with `factors=false`), the variant's error against the exact run is reported: the largest per-tensor
max|Δ_variant − Δ_exact| / max|Δ_exact| and the overall ‖Δ_variant − Δ_exact‖ / ‖Δ_exact‖ over all
merged tensors. With `--lora-rank` the models are peft LoRA adapters on the base (KnOTS's inputs).

Builds a base and n fine-tuned checkpoints (Llama-like tensor shapes, seeded) under a temporary
directory, runs each method through `mcomp.merge.merge_checkpoints` in a fresh subprocess (so
peak memory is per method), and reports wall time and peak *private* memory: the child's
RssAnon (anonymous memory: file pages are excluded) sampled every 10 ms from
/proc/<pid>/status by this process. It also runs PCB the way the released code does it (one
flattened n×d float32 matrix, full sorts) at a size that fits in RAM, and extrapolates it
linearly to the full size (clearly labelled; the sorts make the true time grow faster).
The checkpoints are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 1 << 30


def llama_shapes(params: float, hidden=2048, inter=5632, kv=256, vocab=32000):
    """TinyLlama-1.1B-like shapes; the layer count is chosen to reach about `params`."""
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * inter * hidden + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((params - fixed) / per_layer))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def build(root: Path, shapes, n: int, dtype_name: str, seed: int) -> list[Path]:
    import torch

    from mcomp.merge.sources import TensorInfo
    from mcomp.merge.writer import ShardedWriter

    dtype = getattr(torch, dtype_name)
    layout = [(k, TensorInfo(tuple(s), dtype)) for k, s in shapes.items()]
    dirs = [root / "base"] + [root / f"ft{i}" for i in range(n)]
    writers = []
    for d in dirs:
        d.mkdir(parents=True)
        writers.append(ShardedWriter(d, layout, 2 * 10**9))
    rows_per_block = 256
    for ti, (k, shape) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(seed * 100003 + ti)
        rows = shape[0]
        cols = shape[1] if len(shape) > 1 else 1
        # fine-tuning deltas: per-model, per-tensor scale, heavy-ish tails (t-like via a random scale)
        scales = [0.002 * (1 + 0.25 * i) * (0.5 + float(torch.rand((), generator=g))) for i in range(n)]
        for r0 in range(0, rows, rows_per_block):
            r1 = min(rows, r0 + rows_per_block)
            cnt = (r1 - r0) * cols
            base = torch.randn(cnt, generator=g).mul_(0.02) if len(shape) > 1 else torch.ones(cnt)
            writers[0].write(k, base.to(dtype))
            for i in range(n):
                delta = torch.randn(cnt, generator=g).mul_(scales[i])
                delta.mul_(torch.randn(cnt, generator=g).abs_().add_(0.5))
                writers[i + 1].write(k, base.add(delta).to(dtype))
    for w in writers:
        w.close()
    return dirs


def build_lora(root: Path, shapes, n: int, rank: int, dtype_name: str, seed: int) -> list[Path]:
    """The base checkpoint and n peft LoRA adapters of rank `rank` on every 2-D projection of its layers
    (q, k, v, o, gate, up, down; alpha = 2·rank), seeded."""
    import torch

    from mcomp.peft_format import write_adapter

    dirs = build(root, {k: s for k, s in shapes.items()}, 0, dtype_name, seed)
    dtype = getattr(torch, dtype_name)
    targets = {k: s for k, s in shapes.items() if ".layers." in k and len(s) == 2}
    modules = sorted({k.split(".")[-2] for k in targets})
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 100003 + 7919 * (i + 1))
        pairs = {
            k.removesuffix(".weight"): (
                (torch.randn(rank, cols, generator=g) / math.sqrt(cols)).to(dtype),
                (torch.randn(rows, rank, generator=g) * 0.01).to(dtype),
            )
            for k, (rows, cols) in targets.items()
        }
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": modules}
        write_adapter(root / f"lora{i}", pairs, config=config)
        dirs.append(root / f"lora{i}")
    return dirs


def median_run(results: list[dict]) -> dict:
    """The run with the median merge time (the upper median for an even count); its peak memory
    is the largest of all runs."""
    ordered = sorted(results, key=lambda r: r["seconds"])
    mid = dict(ordered[len(ordered) // 2])
    mid["peak_anon"] = max(r["peak_anon"] for r in results)
    return mid


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_child(args: list[str], script: str = __file__) -> dict:
    """Run `script` (this one) as a worker; sample its anonymous memory; return its JSON result."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon(proc.pid))
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[:2]} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["wall"] = wall
    result["peak_anon"] = max(peak[0], result.get("final_anon", 0))
    return result


def method_spec(spec: str) -> tuple[str, dict]:
    """`name:key=value;key=value` -> (name, {key: value}); values as JSON where they parse."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value.strip()
    return name.strip(), params


# mcomp's methods that mergekit has too, with the parameters mcomp's defaults use (mergekit's names)
MERGEKIT_METHODS = {
    "task_arithmetic": {},
    "linear": {},
    "ties": {"density": 0.2},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01},
    "della": {"density": 0.7, "epsilon": 0.15},
    "della_linear": {"density": 0.7, "epsilon": 0.15},
    "model_stock": {},
}


def has_mergekit() -> bool:
    import importlib.util

    return importlib.util.find_spec("mergekit") is not None


def llama_config(shapes: dict, dtype_name: str) -> dict:
    """A config.json for the synthetic Llama-like checkpoints (mergekit reads the architecture from it)."""
    hidden = shapes["model.embed_tokens.weight"][1]
    kv = shapes["model.layers.0.self_attn.k_proj.weight"][0]
    head = 64
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": shapes["model.layers.0.mlp.up_proj.weight"][0],
        "num_hidden_layers": sum(1 for k in shapes if k.endswith("self_attn.q_proj.weight")),
        "num_attention_heads": hidden // head,
        "num_key_value_heads": kv // head,
        "vocab_size": shapes["model.embed_tokens.weight"][0],
        "torch_dtype": dtype_name,
        "tie_word_embeddings": False,
    }


def worker_mergekit(a) -> None:
    """The same merge through mergekit's own `run_merge` (lazy loading, its defaults otherwise)."""
    import torch

    torch.set_num_threads(a.threads)
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    method, params = method_spec(a.worker.removeprefix("mergekit:"))
    per_model = {
        k: v for k, v in {**MERGEKIT_METHODS[method], **params}.items() if k in ("density", "gamma", "epsilon")
    }
    config = MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": a.base,
            "models": [{"model": m, "parameters": {"weight": 1.0, **per_model}} for m in a.model],
            "dtype": "float16",
        }
    )
    t0 = time.perf_counter()
    options = MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(config, a.out, options=options)
    seconds = time.perf_counter() - t0
    shutil.rmtree(a.out, ignore_errors=True)
    print(json.dumps({"seconds": seconds, "passes": 1, "final_anon": rss_anon(os.getpid())}))


def worker_merge(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    from mcomp.merge import merge_checkpoints

    out = Path(a.out)
    method, params = method_spec(a.worker)
    t0 = time.perf_counter()
    if a.keep_out:  # compared with another run: written in float32, so the comparison sees the merge, not rounding
        params["dtype"] = "float32"
    report = merge_checkpoints(a.base, a.model, out, method, force=True, chunk_elems=a.chunk, device=a.device, **params)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if not a.keep_out:
        shutil.rmtree(out)
    print(json.dumps({"seconds": seconds, "passes": report.passes, "final_anon": rss_anon(os.getpid())}))


def worker_reference(a) -> None:
    """PCB as the released code computes it: flatten n×d float32, sort twice (ratio 0.1, clip 0.01)."""
    import torch

    torch.set_num_threads(a.threads)
    from mcomp.merge.sources import SafetensorsCheckpoint

    srcs = [SafetensorsCheckpoint(p) for p in [a.base, *a.model]]
    keys, total = [], 0
    for k in srcs[0].storage_order():
        if total >= a.ref_params:
            break
        keys.append(k)
        total += srcs[0].infos[k].numel
    t0 = time.perf_counter()

    def flat(src):
        return torch.cat([src.read(k, 0, src.infos[k].numel).float() for k in keys])

    base = flat(srcs[0])
    tvs = torch.stack([flat(s) - base for s in srcs[1:]])

    # --- the released code (PCB-Merging, merging.py), verbatim in substance ---
    def normalize(x, dim=0):
        mn, _ = torch.min(x, dim=dim, keepdim=True)
        mx, _ = torch.max(x, dim=dim, keepdim=True)
        return (x - mn) / (mx - mn)

    def clamp(x, min_ratio=0.0, max_ratio=0.0):
        d = x.size(1)
        sorted_x, _ = torch.sort(x, dim=1)
        lo = sorted_x[:, int(d * min_ratio)].unsqueeze(1)
        hi = sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    n = tvs.shape[0]
    all_checks_abs = clamp(torch.abs(tvs), min_ratio=0.01, max_ratio=0.01)
    clamped = torch.sign(tvs) * all_checks_abs
    self_pcb = normalize(all_checks_abs, 1) ** 2
    self_pcb_act = torch.exp(n * self_pcb)
    cross_pcb = tvs * torch.sum(tvs, dim=0)
    cross_pcb_act = torch.tanh(cross_pcb)
    task_pcb = self_pcb_act * cross_pcb_act
    scale = normalize(clamp(task_pcb, 1 - 0.1, 0), dim=1)
    merged = torch.sum(clamped * scale, dim=0) / torch.clamp(torch.sum(scale, dim=0), min=1e-12)
    out = (base + merged).half()
    seconds = time.perf_counter() - t0
    del out
    print(json.dumps({"seconds": seconds, "params": total, "passes": 1, "final_anon": rss_anon(os.getpid())}))


def compared_pairs(methods: list[str]) -> list[tuple[str, str]]:
    """(exact, variant) specs of one method that both run: the low-rank SVD mode against the exact one, and
    KnOTS from LoRA factors against its dense SVD (`factors=false`)."""
    pairs = []
    for spec in methods:
        name, params = method_spec(spec)
        if params.get("svd") == "lowrank":
            exact = next((m for m in methods if method_spec(m) == (name, {**params, "svd": "full"})), None)
            exact = exact or next((m for m in methods if method_spec(m) == (name, {})), None)
            if exact:
                pairs.append((exact, spec))
        if params.get("factors") is False:
            variant = next((m for m in methods if method_spec(m) == (name, {**params, "factors": True})), None)
            variant = variant or next((m for m in methods if method_spec(m) == (name, {})), None)
            if variant:
                pairs.append((spec, variant))
    return pairs


def variant_error(base_dir: Path, exact_dir: Path, variant_dir: Path) -> tuple[float, float]:
    """(worst per-tensor relative max error, overall relative Frobenius error) of the variant's merge."""
    from mcomp.merge.sources import SafetensorsCheckpoint

    base, exact, lowrank = (SafetensorsCheckpoint(p) for p in (base_dir, exact_dir, variant_dir))
    worst, diff2, norm2 = 0.0, 0.0, 0.0
    for key, info in exact.infos.items():
        if not info.dtype.is_floating_point:
            continue
        b = base.read(key, 0, info.numel).float()
        want = exact.read(key, 0, info.numel).float() - b
        got = lowrank.read(key, 0, info.numel).float() - b
        scale = float(want.abs().max())
        worst = max(worst, float((got - want).abs().max()) / scale if scale > 0 else 0.0)
        diff2 += float((got - want).pow(2).sum())
        norm2 += float(want.pow(2).sum())
    for src in (base, exact, lowrank):
        src.close()
    return worst, math.sqrt(diff2 / norm2) if norm2 > 0 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1e9, help="parameters per checkpoint (default 1e9)")
    ap.add_argument("--models", type=int, default=3, help="fine-tuned models (default 3)")
    ap.add_argument(
        "--shape",
        default="2048,5632,256,32000",
        help="hidden,intermediate,kv,vocab of the Llama-like tensors (default TinyLlama-1.1B's 2048,5632,256,32000)",
    )
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument(
        "--methods", default="task_arithmetic,ties,pcb", help="comma-separated methods, or 'all' (every registered one)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2 = this machine)")
    ap.add_argument("--chunk", type=int, default=1 << 20, help="engine chunk (coordinates)")
    ap.add_argument(
        "--device",
        default="cpu",
        help="where the per-chunk maths runs: cpu or cuda (reading and writing stay on the host)",
    )
    ap.add_argument(
        "--ref-params", type=float, default=3e7, help="size at which the released-code PCB is run (0: skip)"
    )
    ap.add_argument("--workdir", default="/tmp", help="where the synthetic checkpoints go")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds over the methods, interleaved (TA, TIES, PCB, TA, ...); the table shows each "
        "method's median and the ratios of medians (default 1)",
    )
    ap.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="make the models LoRA adapters of this rank on every projection (for KnOTS; 0: full checkpoints)",
    )
    ap.add_argument(
        "--mergekit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run mergekit on the same inputs for the methods it has, when it is installed (default on)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--model", action="append", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--keep-out", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "reference":
        worker_reference(a)
        return 0
    if a.worker and a.worker.startswith("mergekit:"):
        worker_mergekit(a)
        return 0
    if a.worker:
        worker_merge(a)
        return 0

    if not Path(a.workdir).is_dir():
        ap.error(f"--workdir {a.workdir}: no such directory")
    root = Path(tempfile.mkdtemp(prefix="mcomp-bench-", dir=a.workdir))
    try:
        hidden, inter, kv, vocab = (int(v) for v in a.shape.split(","))
        shapes = llama_shapes(a.params, hidden, inter, kv, vocab)
        total = sum(math.prod(s) for s in shapes.values())
        print(
            f"building base + {a.models} fine-tuned checkpoints: {total / 1e9:.3f}B parameters each, {a.dtype}, "
            f"{len(shapes)} tensors, under {root}",
            flush=True,
        )
        t0 = time.perf_counter()
        if a.lora_rank:
            print(f"the models are LoRA adapters of rank {a.lora_rank} on the base", flush=True)
            dirs = build_lora(root, shapes, a.models, a.lora_rank, a.dtype, a.seed)
        else:
            dirs = build(root, shapes, a.models, a.dtype, a.seed)
        os.sync()  # flush the build's dirty pages so no method pays for their writeback
        print(f"built in {time.perf_counter() - t0:.0f} s", flush=True)
        common = ["--base", str(dirs[0])] + sum((["--model", str(d)] for d in dirs[1:]), [])
        common += ["--threads", str(a.threads), "--chunk", str(a.chunk), "--device", a.device]
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        if methods == ["all"]:  # every registered method that merges these n models
            from mcomp.merge import available_methods

            methods = [n for n, c in available_methods().items() if c.model_count in (None, a.models)]
            if a.lora_rank == 0:
                methods.remove("knots")  # made for LoRA inputs (see --lora-rank)
        if a.mergekit and has_mergekit() and not a.lora_rank:
            for d in dirs:
                (d / "config.json").write_text(json.dumps(llama_config(shapes, a.dtype)))
            methods += [f"mergekit:{m}" for m in methods if method_spec(m)[0] in MERGEKIT_METHODS]
        elif a.mergekit:
            print("mergekit is not installed (or the models are LoRA adapters): its column is skipped", flush=True)
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        pairs = compared_pairs(methods)
        compared = {m for pair in pairs for m in pair}
        for round_ in range(max(1, a.repeat)):
            for method in methods:  # interleaved, so a slow spell of the machine hits every method
                print(f"running {method} (round {round_ + 1}) ...", flush=True)
                keep = ["--keep-out"] if method in compared else []
                out = ["--out", str(root / f"out-{methods.index(method)}")]
                runs[method].append(run_child(["--worker", method, *out, *keep, *common]))
                r = runs[method][-1]  # printed now too, so a run cut short still reports what finished
                print(
                    f"  {method}: merge {r['seconds']:.1f} s, wall {r['wall']:.1f} s, "
                    f"peak anon {r['peak_anon'] / GIB:.2f} GiB",
                    flush=True,
                )
        rows = [(m, median_run(runs[m])) for m in methods]
        if a.repeat > 1:
            print(
                "\nper-round merge seconds: "
                + "; ".join(f"{m} " + ", ".join(f"{r['seconds']:.1f}" for r in runs[m]) for m in methods)
            )
        ref_row = None
        if a.ref_params > 0 and not a.lora_rank:  # the released PCB takes full checkpoints
            print("running PCB the released-code way (in memory) ...", flush=True)
            ref_row = run_child(["--worker", "reference", "--ref-params", str(a.ref_params), *common])

        ta = next((r for m, r in rows if m == "task_arithmetic"), None)
        print()
        print(f"load average during the runs (other users of the 2 cores): {os.getloadavg()[0]:.2f} (1 min)")
        models = f"rank-{a.lora_rank} LoRA adapters" if a.lora_rank else "models"
        print(
            f"Synthetic Llama-like checkpoints: base + {a.models} {models} x {total / 1e9:.3f}B params, {a.dtype}; "
            f"{a.threads} torch threads; maths on {a.device}; engine chunk {a.chunk}; "
            f"median of {max(1, a.repeat)} run(s) per method"
        )
        head = f"{'method':<44} {'merge s':>9} {'wall s':>8} {'passes':>6} {'peak anon GiB':>14} {'time / TA':>10}"
        print(head)
        print("-" * len(head))
        for method, r in rows:
            ratio = f"{r['seconds'] / ta['seconds']:.2f}" if ta else "-"
            print(
                f"{method:<44} {r['seconds']:>9.1f} {r['wall']:>8.1f} {r['passes']:>6} "
                f"{r['peak_anon'] / GIB:>14.2f} {ratio:>10}"
            )
        if ref_row:
            p = ref_row["params"]
            f = total / p
            print(
                f"{'pcb released-code way, measured @ %.2gB' % (p / 1e9):<44} {ref_row['seconds']:>9.1f} "
                f"{ref_row['wall']:>8.1f} {'-':>6} {ref_row['peak_anon'] / GIB:>14.2f} {'-':>10}"
            )
            ext_t = ref_row["seconds"] * f
            ext_ratio = f"{ext_t / ta['seconds']:.2f}" if ta else "-"
            print(
                f"{'pcb released-code way, EXTRAPOLATED x%.1f' % f:<44} {ext_t:>9.0f} {'-':>8} {'-':>6} "
                f"{ref_row['peak_anon'] * f / GIB:>14.1f} {ext_ratio:>10}"
            )
        for exact, variant in pairs:
            worst, overall = variant_error(
                dirs[0], root / f"out-{methods.index(exact)}", root / f"out-{methods.index(variant)}"
            )
            print(
                f"{variant} against {exact}: per-tensor max|Δ_variant − Δ_exact| / max|Δ_exact| up to {worst:.2e}; "
                f"‖Δ_variant − Δ_exact‖ / ‖Δ_exact‖ = {overall:.2e} over all merged tensors"
            )
        by_name = dict(rows)
        for method, r in rows:
            if method.startswith("mergekit:") and method.removeprefix("mergekit:") in by_name:
                ours = by_name[method.removeprefix("mergekit:")]
                print(
                    f"mcomp {method.removeprefix('mergekit:')} / mergekit's: {ours['seconds'] / r['seconds']:.2f}x the "
                    f"time, {ours['peak_anon'] / max(r['peak_anon'], 1):.2f}x the peak private memory"
                )
        pcb = next((r for m, r in rows if m == "pcb"), None)
        if pcb and ta:
            print()
            print(
                f"PCB / task arithmetic wall time (merge s): {pcb['seconds'] / ta['seconds']:.2f}x   "
                f"PCB peak private memory: {pcb['peak_anon'] / GIB:.2f} GiB"
            )
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
