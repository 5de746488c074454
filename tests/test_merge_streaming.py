"""Streaming engine on disk, bad inputs, CLI with a tiny Llama, LoRA adapters, coefficient search."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import merge_reference as ref  # noqa: E402

from mcomp.merge import merge_checkpoints, merge_state_dicts, native  # noqa: E402
from mcomp.merge.sources import SafetensorsCheckpoint  # noqa: E402
from mcomp.merge.writer import ShardedWriter  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_models(n=3, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.weight": (300, 64),
        "layers.0.q.weight": (64, 64),
        "layers.0.norm.weight": (64,),
        "layers.1.up.weight": (128, 64),
        "step": (),
    }
    base = {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in shapes.items() if k != "step"}
    base["step"] = torch.tensor(3, dtype=torch.int64)
    models = []
    for _ in range(n):
        m = {
            k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }
        models.append(m)
    return base, models


def record_queued_blocks(monkeypatch, module: str) -> list:
    """The futures of every `queue_blocks` call the acceleration module makes (blocks left running)."""
    from mcomp.merge import kernels

    queued, real = [], kernels.queue_blocks

    def spy(fn, size, block):
        queued.append(real(fn, size, block))
        return queued[-1]

    monkeypatch.setattr(f"mcomp.merge.accelerated.{module}.queue_blocks", spy)
    return queued


def save_sharded(sd, directory: Path, shard_bytes=20_000):
    """Write a sharded checkpoint + index with the streaming writer (also exercises it)."""
    directory.mkdir(parents=True)
    from mcomp.merge.sources import TensorInfo

    layout = [(k, TensorInfo(tuple(v.shape), v.dtype)) for k, v in sd.items()]
    w = ShardedWriter(directory, layout, shard_bytes)
    for k, v in sd.items():
        w.write(k, v.reshape(-1))
    w.close()
    return directory


def load_dir(directory: Path):
    src = SafetensorsCheckpoint(directory)
    out = {k: src.read(k, 0, i.numel).reshape(i.shape) for k, i in src.infos.items()}
    src.close()
    return out


@pytest.fixture()
def ckpts(tmp_path):
    base, models = random_models()
    paths = [save_sharded(base, tmp_path / "base")]
    paths += [save_sharded(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    return base, models, paths


@pytest.mark.parametrize(
    "method,params",
    [
        ("task_arithmetic", {"weights": [0.5, 1.0, 0.7]}),
        ("ties", {"density": 0.25}),
        ("pcb", {"ratio": 0.1, "clip": 0.01, "inter": "v2"}),
        ("pcb", {"scope": "tensor"}),
        ("dare_ties", {"density": 0.5, "seed": 4}),
        ("dare_linear", {"density": 0.5, "rescale": "l1", "scope": "global"}),
    ],
)
def test_streaming_equals_in_memory(ckpts, tmp_path, method, params):
    base, models, paths = ckpts
    out = tmp_path / "out"
    report = merge_checkpoints(paths[0], paths[1:], out, method, chunk_elems=1000, max_shard_size=30_000, **params)
    assert (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    streamed = load_dir(out)
    in_memory = merge_state_dicts(base, models, method, **params)
    assert set(streamed) == set(base)
    for k in base:
        assert streamed[k].dtype == base[k].dtype
        if method == "dare_linear":  # float64 norm sums depend on chunking in the last bit
            torch.testing.assert_close(streamed[k], in_memory[k], rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(streamed[k], in_memory[k]), k
    assert report.passes >= 1
    # safe_open reads the output too
    with safe_open(str(out / index["weight_map"]["embed.weight"]), "pt") as f:
        assert torch.equal(f.get_tensor("embed.weight"), streamed["embed.weight"])


def test_streaming_pcb_matches_reference_fp16_in_fp32_out(ckpts, tmp_path):
    base, models, paths = ckpts
    merge_checkpoints(paths[0], paths[1:], tmp_path / "o", "pcb", chunk_elems=777, dtype="float32", ratio=0.2)
    out = load_dir(tmp_path / "o")
    fb = {k: v.float() for k, v in base.items() if v.is_floating_point()}
    expect = ref.by_scope(fb, [{k: m[k].float() for k in fb} for m in models], "global", lambda t: ref.pcb(t, 0.2))
    err = max(float((out[k] - expect[k]).abs().max()) for k in fb) / max(float(v.abs().max()) for v in expect.values())
    assert err < 1e-6
    assert out["step"].dtype == torch.int64 and int(out["step"]) == 3


def test_bad_inputs_are_named(ckpts, tmp_path):
    base, models, paths = ckpts
    bad = dict(models[0])
    bad["extra"] = torch.zeros(2, dtype=torch.float16)
    save_file(bad, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"different tensors.*extra"):
        merge_checkpoints(paths[0], [tmp_path / "extra.safetensors"], tmp_path / "o1")
    shape = dict(models[0])
    shape["layers.0.q.weight"] = torch.zeros(64, 63, dtype=torch.float16)
    save_file(shape, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.0\.q\.weight.*shape.*shape\.safetensors"):
        merge_checkpoints(paths[0], [paths[1], tmp_path / "shape.safetensors"], tmp_path / "o2")
    dt = {k: (v.to(torch.bfloat16) if k == "embed.weight" else v) for k, v in models[0].items()}
    save_file(dt, str(tmp_path / "dtype.safetensors"))
    with pytest.raises(ValueError, match=r"embed\.weight.*dtype.*dtype\.safetensors"):
        merge_checkpoints(paths[0], [tmp_path / "dtype.safetensors"], tmp_path / "o3")
    nan = {k: v.clone() for k, v in models[1].items()}
    nan["layers.1.up.weight"][5, 7] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.up\.weight.*NaN.*nan\.safetensors"):
        merge_checkpoints(paths[0], [paths[1], tmp_path / "nan.safetensors"], tmp_path / "o4", "pcb", chunk_elems=500)
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    with pytest.raises(ValueError, match="ratio"):
        merge_checkpoints(paths[0], paths[1:], tmp_path / "o5", "pcb", ratio=2.0)


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built")
@pytest.mark.parametrize("where", ["model", "base"])
@pytest.mark.parametrize(
    "method,params",
    [
        ("pcb", {}),
        ("task_arithmetic", {}),
        ("ties", {"density": 0.3}),
        ("dare_ties", {"density": 0.5, "seed": 1}),
        ("dare_linear", {"density": 0.5, "rescale": "l1", "seed": 1}),
    ],
)
def test_first_pass_checks_finite_as_it_reads(ckpts, tmp_path, monkeypatch, where, method, params):
    """A method's first pass over stored values (a statistics pass, or task arithmetic's merge pass)
    checks NaN/Inf itself (the engine's separate check is not run), and the error still names the
    tensor and the checkpoint at fault."""
    base, models, paths = ckpts
    monkeypatch.setattr(native, "all_finite", lambda *a: pytest.fail("the engine read the chunk to check it"))
    merge_checkpoints(paths[0], paths[1:], tmp_path / "ok", method, chunk_elems=500, **params)  # finite: merges
    bad = {k: v.clone() for k, v in (models[2] if where == "model" else base).items()}
    bad["layers.0.q.weight"][3, 9] = float("inf")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    inputs = (
        [paths[0], paths[1], tmp_path / "bad.safetensors"]
        if where == "model"
        else [tmp_path / "bad.safetensors", *paths[1:]]
    )
    name = r"bad\.safetensors" if where == "model" else r"base.*bad\.safetensors"
    with pytest.raises(ValueError, match=r"layers\.0\.q\.weight.*" + name):
        merge_checkpoints(inputs[0], inputs[1:], tmp_path / "out", method, chunk_elems=500, **params)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built")
@pytest.mark.parametrize("method", ["pcb", "ties"])
def test_deferred_blocks_name_the_chunk_they_found_nan_in(ckpts, tmp_path, monkeypatch, method):
    """The statistics blocks of PCB and TIES run on while the next chunks are read (the stored views
    last); an Inf one of them finds is raised once every block of the pass has finished, and the error
    names the tensor and checkpoint at fault, not the chunk being read when it surfaced."""
    from mcomp.merge.accelerated.family import AcceleratedFamily
    from mcomp.merge.accelerated.pcb import AcceleratedPcb

    base, models, paths = ckpts
    bad = {k: v.clone() for k, v in models[2].items()}
    bad["layers.0.q.weight"][3, 9] = float("inf")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    queued = record_queued_blocks(monkeypatch, "pcb" if method == "pcb" else "family")
    monkeypatch.setattr(AcceleratedPcb, "NATIVE_BLOCK_VALUES", 3 * 70)
    monkeypatch.setattr(AcceleratedFamily, "BLOCK_VALUES", 3 * 70)
    torch.set_num_threads(2)  # the module fixture restores it
    with pytest.raises(ValueError, match=r"'layers\.0\.q\.weight' contains NaN or Inf.*model\(s\) .*bad\.safetensors"):
        inputs = [*paths[1:3], tmp_path / "bad.safetensors"]
        merge_checkpoints(paths[0], inputs, tmp_path / "out", method, chunk_elems=500)
    assert sum(len(f) for f in queued) > 10  # blocks were left running between chunks
    assert all(f.done() for blocks in queued for f in blocks)  # none outlived the pass
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built")
@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("dare_ties", {"density": 0.5, "seed": 1})])
def test_stored_values_the_kernels_refuse_are_still_checked(ckpts, tmp_path, monkeypatch, method, params):
    """Stored values that reach a family method's torch path (the kernels refusing them) are checked
    for NaN/Inf there, as the method told the engine it would."""
    base, models, paths = ckpts
    bad = {k: v.clone() for k, v in models[1].items()}
    bad["layers.1.up.weight"][5, 7] = float("nan")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    real = native.usable
    monkeypatch.setattr(native, "usable", lambda x: False if isinstance(x, native.StoredColumns) else real(x))
    monkeypatch.setattr(native, "all_finite", lambda *a: pytest.fail("the engine read the chunk to check it"))
    # the input's own check names the model (the output's check, a last guard, would name every input)
    with pytest.raises(ValueError, match=r"'layers\.1\.up\.weight' contains NaN or Inf.*model\(s\) .*bad\.safetensors"):
        merge_checkpoints(paths[0], [paths[1], tmp_path / "bad.safetensors"], tmp_path / "out", method, **params)
    assert not (tmp_path / "out").exists()


def test_the_writer_behind_the_merge_pass(ckpts, tmp_path, monkeypatch):
    """On the CPU the sink's part of an acceleration's merge pass runs on a writer thread one chunk
    behind: the sink sees every chunk once, in order, with this chunk's values (not the next one's,
    merged meanwhile in the other workspace), and an error in the sink ends the merge with no write
    after it."""
    from mcomp.merge.memory import MemorySink
    from mcomp.merge.sources import SafetensorsCheckpoint
    from mcomp.merge.streaming import MergeEngine

    base, models, paths = ckpts

    def engine() -> MergeEngine:
        inputs = [SafetensorsCheckpoint(p) for p in paths]
        return MergeEngine(inputs[0], inputs[1:], "ties", chunk_elems=500)

    seen, threads = [], set()

    class Recording(MemorySink):
        def put(self, seg, base, delta):
            threads.add(threading.current_thread().name)
            seen.append((seg.name, seg.start))
            super().put(seg, base, delta)

    eng = engine()
    behind = Recording(dict(eng.layout()))
    eng.run(behind)
    assert any(t.startswith("mcomp-write") for t in threads)
    assert seen == [(s.name, s.start) for c in eng.chunks(eng.merge_keys) for s in c.segments]
    eng = engine()
    eng.pipeline = True  # the plain merge pass, in this thread
    plain = MemorySink(dict(eng.layout()))
    eng.run(plain)
    for k in eng.merge_keys:
        assert torch.equal(behind.out[k], plain.out[k]), k

    class Failing(MemorySink):
        def put(self, seg, base, delta):
            seen.append(seg.start)
            if len(seen) == 3:
                raise OSError("disk full")
            super().put(seg, base, delta)

    seen.clear()
    eng = engine()
    with pytest.raises(OSError, match="disk full"):
        eng.run(Failing(dict(eng.layout())))
    time.sleep(0.05)
    assert len(seen) == 3  # nothing written after the error


def test_existing_output_refused_unless_force(ckpts, tmp_path):
    base, models, paths = ckpts
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        merge_checkpoints(paths[0], paths[1:], out)
    merge_checkpoints(paths[0], paths[1:], out, force=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()


def test_interrupted_merge_leaves_nothing_complete(ckpts, tmp_path, monkeypatch):
    base, models, paths = ckpts
    from mcomp.merge import api

    calls = {"n": 0}
    orig = api.CheckpointSink.put

    def boom(self, seg, b, d):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self, seg, b, d)

    monkeypatch.setattr(api.CheckpointSink, "put", boom)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(paths[0], paths[1:], tmp_path / "out", chunk_elems=500)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# -- CLI with a tiny Llama -----------------------------------------------------------------------
def test_cli_merge_tiny_llama_loads_with_transformers(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from mcomp.commands import merge as merge_cmd
    from mcomp.tiny import build_llm

    base = build_llm(tokenizer, seed=0)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    sd = base.state_dict()
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        m = build_llm(tokenizer, seed=0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        m.save_pretrained(tmp_path / f"ft{i}")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"""
merge_method: pcb
base_model: {tmp_path / "base"}
models:
  - model: {tmp_path / "base"}
  - model: {tmp_path / "ft0"}
    parameters: {{weight: 1.2}}
  - model: {tmp_path / "ft1"}
    parameters: {{weight: 1.0}}
parameters: {{ratio: 0.2, clip: 0.01}}
dtype: float32
""")
    import argparse

    parser = argparse.ArgumentParser()
    merge_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["merge", str(cfg), "--out", str(tmp_path / "merged"), "--no-progress"])
    assert args.func(args) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    msd = merged.state_dict()
    assert any(not torch.equal(msd[k], sd[k]) for k in sd if k in msd)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits).all()
    # again without --force: refused, the output is untouched
    with pytest.raises(FileExistsError, match="--force"):
        args.func(args)
    assert (tmp_path / "merged" / "config.json").is_file()


# -- LoRA -------------------------------------------------------------------------------------------
def make_adapter(directory: Path, shapes: dict[str, tuple[int, int]], r: int, alpha: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (out_dim, in_dim) in shapes.items():
        module = key[: -len(".weight")]
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_dim, generator=g) * 0.1
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, r, generator=g) * 0.1
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    targets = sorted({k.split(".")[-2] for k in shapes})
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "fan_in_fan_out": False}
        )
    )
    return directory


def test_lora_merge_fold_refactorise_and_linear_terms(ckpts, tmp_path):
    from mcomp.merge import merge_task_vectors
    from mcomp.merge.lora import apply_linear_terms, load_lora, lora_deltas, lora_linear_terms, merge_lora_adapters

    base, models, paths = ckpts
    shapes = {"layers.0.q.weight": (64, 64), "layers.1.up.weight": (128, 64)}
    a1 = make_adapter(tmp_path / "a1", shapes, r=4, alpha=8, seed=1)
    a2 = make_adapter(tmp_path / "a2", {"layers.0.q.weight": (64, 64)}, r=2, alpha=2, seed=2)
    ad = [load_lora(a1), load_lora(a2)]
    # ΔW-space merge (the second adapter does not touch `up`: ΔW = 0 there)
    merged = merge_lora_adapters(ad, "ties", density=0.5)
    d1, d2 = lora_deltas(ad[0]), lora_deltas(ad[1])
    torch.testing.assert_close(
        d1["layers.0.q.weight"], 2.0 * ad[0].modules["layers.0.q.weight"].B @ ad[0].modules["layers.0.q.weight"].A
    )
    expect = merge_task_vectors([d1, {**d2, "layers.1.up.weight": torch.zeros(128, 64)}], "ties", density=0.5)
    for k in expect:
        torch.testing.assert_close(merged[k], expect[k])
    # fold into the base weights, streaming
    out = tmp_path / "folded"
    merge_checkpoints(paths[0], [a1, a2], out, "ties", density=0.5, chunk_elems=1000, dtype="float32")
    folded = load_dir(out)
    for k in shapes:
        torch.testing.assert_close(folded[k], base[k].float() + expect[k], rtol=1e-6, atol=1e-6)
    assert torch.equal(folded["embed.weight"], base["embed.weight"].float())
    # re-factorise to rank 6: the linear merge of rank 4 + rank 2 is exact at rank 6
    out2 = tmp_path / "relora"
    rep = merge_checkpoints(paths[0], [a1, a2], out2, "task_arithmetic", lora_rank=6)
    errs = rep.stats[-1]["lora_reconstruction"]
    assert max(errs.values()) < 1e-5 and rep.stats[-1]["lora_total_error"] < 1e-5
    re = load_lora(out2)
    lin = merge_lora_adapters(ad, "task_arithmetic")
    for k in lin:
        torch.testing.assert_close(re.modules[k].delta(), lin[k], rtol=1e-4, atol=1e-5)
    rep3 = merge_checkpoints(paths[0], [a1, a2], tmp_path / "r2", "task_arithmetic", lora_rank=2)
    assert rep3.stats[-1]["lora_total_error"] > 1e-3
    # exact, unmaterialised linear combination
    terms = lora_linear_terms(ad, weights=[0.5, 2.0], scale=1.5)
    x = torch.randn(5, 64)
    lin_w = merge_lora_adapters(ad, "task_arithmetic", weights=[0.5, 2.0], scale=1.5)
    torch.testing.assert_close(
        apply_linear_terms(terms["layers.0.q.weight"], x), x @ lin_w["layers.0.q.weight"].T, rtol=1e-5, atol=1e-6
    )


# -- coefficient search --------------------------------------------------------------------------------
def test_search_reuses_scores_and_is_seeded():
    from mcomp.merge.search import PreparedMerge, search_coefficients

    base, models = random_models(dtype=torch.float32)
    prep = PreparedMerge(base, models, "pcb", ratio=0.2)
    a = prep.merge([1.1, 0.9, 1.25])
    b = merge_state_dicts(base, models, "pcb", ratio=0.2, weights=[1.1, 0.9, 1.25])
    assert all(torch.equal(a[k], b[k]) for k in a)
    target = merge_state_dicts(base, models, "pcb", ratio=0.2, weights=[1.25, 0.85, 1.0])
    keys = [k for k in base if base[k].is_floating_point()]

    def objective(sd):  # "validation loss": distance to a known good merge
        return sum(float(((sd[k] - target[k]) ** 2).sum()) for k in keys)

    r1 = search_coefficients(base, models, objective, ratio=0.2, bounds=(0.8, 1.3), budget=40, seed=3)
    r2 = search_coefficients(base, models, objective, ratio=0.2, bounds=(0.8, 1.3), budget=40, seed=3)
    assert r1.weights == r2.weights and r1.evaluations == 40
    assert r1.score < objective(prep.merge([1.0, 1.0, 1.0]))


@pytest.mark.parametrize("inter", ["v1", "v3"])
def test_streaming_pcb_candidate_columns_change_nothing(ckpts, tmp_path, monkeypatch, inter):
    """The merge pass computes β only where stage 1 saw some β_i above its bracket floor; the
    output must be bit-identical to computing β everywhere."""
    from mcomp.merge.accelerated.pcb import AcceleratedPcb as Pcb

    base, models, paths = ckpts
    fast = merge_checkpoints(
        paths[0], paths[1:], tmp_path / "fast", "pcb", chunk_elems=1000, ratio=0.1, inter=inter, dtype="float32"
    )
    assert 0 < fast.stats[0]["candidates"] < 0.6  # the restricted path ran, on a minority of columns
    monkeypatch.setattr(Pcb, "CANDIDATE_MASK_BYTES", 0)
    full = merge_checkpoints(
        paths[0], paths[1:], tmp_path / "full", "pcb", chunk_elems=1000, ratio=0.1, inter=inter, dtype="float32"
    )
    assert "candidates" not in full.stats[0]
    a, b = load_dir(tmp_path / "fast"), load_dir(tmp_path / "full")
    for k in base:
        assert torch.equal(a[k], b[k]), k


def test_streaming_pcb_stage1_bracket_miss_recomputes_the_maximum(ckpts, tmp_path, monkeypatch):
    """Stage 1's sample brackets above every β: the fused pass computes β only where it may reach a
    bracket, here nowhere, so its maxima are not β's; the fallback pass that finds the thresholds
    must find the maxima too. The output equals the one from the sample's brackets."""
    from mcomp.merge.selection import RowQuantiles

    base, models, paths = ckpts
    good = merge_checkpoints(paths[0], paths[1:], tmp_path / "good", "pcb", chunk_elems=1000, dtype="float32")
    real = RowQuantiles.use_sample

    def too_high(self, sample):
        real(self, sample)
        if len(self.targets) == len(models):  # stage 1's thresholds, one per row (stage 0 has two)
            for t in self.targets:
                t.lo, t.hi = 1e6, 2e6

    monkeypatch.setattr(RowQuantiles, "use_sample", too_high)
    missed = merge_checkpoints(paths[0], paths[1:], tmp_path / "missed", "pcb", chunk_elems=1000, dtype="float32")
    assert missed.passes > good.passes  # the fallback ran
    assert missed.stats[0]["m"] == good.stats[0]["m"] and missed.stats[0]["t"] == good.stats[0]["t"]
    a, b = load_dir(tmp_path / "missed"), load_dir(tmp_path / "good")
    for k in base:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kernels_used", ["native", "numpy"])
def test_streaming_pcb_parallel_blocks_change_nothing(ckpts, tmp_path, monkeypatch, kernels_used):
    """With two threads the per-chunk maths runs in column blocks on a pool (statistics reduced
    block by block, out of order); the output must be bit-identical to one block on one thread,
    with the fused native kernels and with the NumPy chain."""
    from mcomp.merge import kernels, native
    from mcomp.merge.accelerated.pcb import AcceleratedPcb as Pcb

    if kernels_used == "native" and not native.available():
        pytest.skip("mcomp.merge._native is not built")
    if kernels_used == "numpy":
        monkeypatch.setattr(native, "_lib", None)

    base, models, paths = ckpts
    parallel = []
    real, real_queue = kernels.column_blocks, kernels.queue_blocks

    def spy(fn, size, block, workspace):
        parallel.append(size > block and kernels.parallel_width() > 1)
        return real(fn, size, block, workspace)

    def spy_queue(fn, size, block):  # the statistics passes' blocks, left running between chunks
        parallel.append(size > block and kernels.parallel_width() > 1)
        return real_queue(fn, size, block)

    monkeypatch.setattr("mcomp.merge.accelerated.pcb.column_blocks", spy)
    monkeypatch.setattr("mcomp.merge.accelerated.pcb.queue_blocks", spy_queue)
    fused = []
    real_stage1 = native.pcb_stage1
    monkeypatch.setattr(native, "pcb_stage1", lambda *a: fused.append(1) or real_stage1(*a))
    monkeypatch.setattr(Pcb, "BLOCK_VALUES", 3 * 70)
    monkeypatch.setattr(Pcb, "NATIVE_BLOCK_VALUES", 3 * 70)
    torch.set_num_threads(2)  # the module fixture restores it
    blocked = merge_checkpoints(
        paths[0], paths[1:], tmp_path / "blocked", "pcb", chunk_elems=1000, ratio=0.1, dtype="float32"
    )
    assert sum(parallel) > 10 and blocked.stats[0]["candidates"] > 0
    assert fused == [] if kernels_used == "numpy" else len(fused) > 10  # stage 1's fused kernel ran
    torch.set_num_threads(1)
    monkeypatch.setattr(Pcb, "BLOCK_VALUES", 1 << 30)
    monkeypatch.setattr(Pcb, "NATIVE_BLOCK_VALUES", 1 << 30)
    merge_checkpoints(paths[0], paths[1:], tmp_path / "single", "pcb", chunk_elems=1000, ratio=0.1, dtype="float32")
    a, b = load_dir(tmp_path / "blocked"), load_dir(tmp_path / "single")
    for k in base:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built")
@pytest.mark.parametrize(
    "method,params,deferred",
    [
        ("ties", {"density": 0.3}, True),
        ("dare_ties", {"density": 0.5, "seed": 3}, False),
        ("dare_linear", {"density": 0.5, "rescale": "l1", "scope": "global", "seed": 3}, False),
    ],
)
def test_streaming_family_deferred_blocks_change_nothing(ckpts, tmp_path, monkeypatch, method, params, deferred):
    """With two threads TIES's trim blocks are left running while the next chunks are read; DARE's
    passes (masks drawn chunk by chunk, float64 L1 sums whose order matters) wait for each chunk. The
    sign balance and the output must be bit-identical to one block on one thread."""
    from mcomp.merge.accelerated.family import AcceleratedFamily

    base, models, paths = ckpts
    queued, balances = record_queued_blocks(monkeypatch, "family"), []
    real_signs = native.family_signs
    # the sign balance itself (the merged values change only where it flips the majority sign)
    monkeypatch.setattr(native, "family_signs", lambda *a: balances.append(real_signs(*a)[0]) or real_signs(*a))
    monkeypatch.setattr(AcceleratedFamily, "BLOCK_VALUES", 3 * 70)
    torch.set_num_threads(2)  # the module fixture restores it
    merge_checkpoints(paths[0], paths[1:], tmp_path / "blocked", method, chunk_elems=1000, **params)
    assert (sum(len(f) for f in queued) > 10) == deferred
    blocked_balance, balances[:] = sum(balances), []
    torch.set_num_threads(1)
    monkeypatch.setattr(AcceleratedFamily, "BLOCK_VALUES", 1 << 30)
    merge_checkpoints(paths[0], paths[1:], tmp_path / "single", method, chunk_elems=1000, **params)
    assert blocked_balance == sum(balances)
    a, b = load_dir(tmp_path / "blocked"), load_dir(tmp_path / "single")
    for k in base:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("inter", ["v1", "v3"])
def test_streaming_pcb_from_stored_values_changes_nothing(tmp_path, monkeypatch, dtype, inter):
    """PCB's stage 1 and merge pass take each chunk in its stored dtype and decode it in the
    native kernels; the output must be bit-identical to the engine's float32 read."""
    from mcomp.merge import native
    from mcomp.merge.accelerated.pcb import AcceleratedPcb as Pcb
    from mcomp.merge.streaming import MergeEngine

    if not native.available():
        pytest.skip("mcomp.merge._native is not built")
    base, models = random_models(dtype=dtype)
    paths = [save_sharded(base, tmp_path / "base")] + [
        save_sharded(m, tmp_path / f"m{i}") for i, m in enumerate(models)
    ]
    stored = []
    real = MergeEngine.read_stored
    monkeypatch.setattr(MergeEngine, "read_stored", lambda *a, **k: stored.append(1) or real(*a, **k))
    merge_checkpoints(paths[0], paths[1:], tmp_path / "stored", "pcb", chunk_elems=1000, inter=inter)
    assert len(stored) > 10  # stage 1 and the merge pass read stored values
    monkeypatch.setattr(Pcb, "accepts_stored", lambda self, stage: False)
    merge_checkpoints(paths[0], paths[1:], tmp_path / "float32", "pcb", chunk_elems=1000, inter=inter)
    a, b = load_dir(tmp_path / "stored"), load_dir(tmp_path / "float32")
    for k in base:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "method,params",
    [
        ("ties", {"density": 0.4}),
        ("dare_ties", {"density": 0.6, "seed": 2}),
        ("consensus", {}),
        ("breadcrumbs", {"density": 0.5}),
        ("tsv", {}),
        ("pcb", {"ratio": 0.3}),
    ],
)
@pytest.mark.parametrize("inputs", ["checkpoints", "lora"])
def test_the_pipelined_reader_gives_the_same_bytes(ckpts, tmp_path, monkeypatch, method, params, inputs):
    """`pipeline`: the next chunk read on a thread while the current one is computed (the device path's
    structure, here with the device set to the CPU) merges the same bytes as reading in turn."""
    import threading

    from mcomp.merge.streaming import MergeEngine

    base, _, paths = ckpts
    models = paths[1:]
    if inputs == "lora":
        shapes = {"layers.0.q.weight": (64, 64), "layers.1.up.weight": (128, 64)}
        models = [make_adapter(tmp_path / f"a{i}", shapes, r=4, alpha=8, seed=i) for i in range(3)]
    readers = set()
    real = MergeEngine.read_host

    def spy(self, *args, **kwargs):
        readers.add(threading.current_thread().name.split("_")[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MergeEngine, "read_host", spy)
    outs = {}
    for pipeline in (False, True):
        out = tmp_path / f"out-{pipeline}"
        merge_checkpoints(paths[0], models, out, method, chunk_elems=3000, pipeline=pipeline, **params)
        outs[pipeline] = load_dir(out)
    for k in outs[False]:
        assert torch.equal(outs[True][k], outs[False][k]), k
    # a group of several chunks read through the host reader (not as stored values) is pipelined;
    # the whole-tensor methods' groups are one chunk each
    if method in ("consensus", "breadcrumbs") or (inputs == "lora" and method != "tsv"):
        assert "mcomp-read" in readers, readers
