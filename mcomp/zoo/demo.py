"""`mcomp demo`: the whole published experiment in miniature, on a laptop CPU.

Builds (or reuses) the zoo, then for every model seed evaluates on the world's MCUB test split:
- reference rows: the base LLM with the stage-1 projectors (no LoRA), and each single-modality
  model on questions reduced to its own modality;
- image+audio and all-modality compositions with NaiveMC and DAMC under each merge backend
  (image+audio on MCUB-4 questions reduced to those two inputs; all on MCUB-4 and MCUB-3).
A modality added by a modality file (`modalities`) gets its encoder and models in the zoo (their
held-out accuracy in the summary) and joins the all-modality compositions.
The leaderboard averages the seeds of each cell (mean ± spread across seeds).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from mcomp.io import atomic_write_text
from mcomp.modalities import MODALITIES as TABLE
from mcomp.modalities import ORDER
from mcomp.zoo.build import Zoo, build_zoo, held_out_report

logger = logging.getLogger(__name__)

COMBOS = {"image+audio": ("image", "audio"), "image+audio+video+point": ORDER}
MERGES = {
    "linear": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5, "seed": 0},
    "pcb": {"ratio": 0.5, "clip": 0.01},
}


def demo_merges(names: list[str]) -> dict[str, dict]:
    """{backend: parameters} for `names` (registered merge methods): the demo's own parameters where
    `MERGES` has them, the method's defaults otherwise."""
    from mcomp.merge.registry import available_methods

    methods = available_methods()
    out = {}
    for name in (n.strip() for n in names if n.strip()):
        if name not in methods:
            raise ValueError(f"--merge {name!r}: not a registered merge method ({', '.join(sorted(methods))})")
        if methods[name].model_count is not None:
            raise ValueError(f"--merge {name!r} takes exactly {methods[name].model_count} model(s): it cannot compose")
        out[name] = dict(MERGES.get(name, {}))
    if not out:
        raise ValueError("--merge names no merge method")
    return out


EVALS_VERSION = 2  # bump when what a demo run computes changes (its kept runs are then redone)
EVAL_BATCH = 16  # questions whose contexts run as one forward (scripts/bench_loglik.py: 1.26x on a 1-thread worker)
WORLD_KEY = {m.name: m.published_key for m in TABLE.values()}


def reduced_task(zoo: Zoo, modalities: tuple[str, ...], out: Path) -> Path:
    """A task file (data, like the shipped ones) over MCUB-4 questions keeping only `modalities`."""
    world = zoo.world
    root = Path(world.mcub_root("test"))
    questions = json.loads((root / "data/test/MCUB-4.json").read_text())
    keep = {WORLD_KEY[m] for m in modalities}
    dropped = [TABLE[m].placeholder for m in ORDER if m not in modalities]
    reduced = []
    for q in questions:
        human = q["conversations"][0]["value"]
        lines = [ln for ln in human.split("\n") if not any(t in ln for t in dropped)]
        turns = [dict(q["conversations"][0], value="\n".join(lines))] + q["conversations"][1:]
        reduced.append(
            dict(q, conversations=turns, modal_inputs={k: v for k, v in q["modal_inputs"].items() if k in keep})
        )
    name = "+".join(modalities)
    # absolute: the task loader reads relative question paths against the data root
    qpath = (out / "tasks" / f"MCUB-4-{name}.json").resolve()
    qpath.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(qpath, json.dumps(reduced))
    task = _shipped_task("mcub4")
    task["name"] = f"mcub4[{name}]"
    task["description"] = f"MCUB-4 questions reduced to the {name} inputs"
    task["subsets"] = [{"name": f"MCUB-4[{name}]", "questions": str(qpath), "modalities": list(modalities)}]
    tpath = out / "tasks" / f"mcub4-{name}.yaml"
    atomic_write_text(tpath, yaml.safe_dump(task, sort_keys=False))
    return tpath


def cloze_task(name: str, out: Path) -> Path:
    """A shipped task file as the demo runs it (data, next to the reduced ones)."""
    tpath = out / "tasks" / f"{name}.yaml"
    tpath.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tpath, yaml.safe_dump(_shipped_task(name), sort_keys=False))
    return tpath


def _shipped_task(name: str) -> dict:
    """A shipped task in the world's cloze formulation: in log-likelihood mode each option is scored
    by its text, as the world's questions are answered (`mcomp.world.questions.ANSWER_SUFFIX`); the
    prediction is still that option's letter, compared with the answer file's letter."""
    from mcomp.resources import load_config

    task = dict(load_config("tasks", f"{name}.yaml"))
    modes = dict(task["modes"])
    modes["loglik"] = dict(modes["loglik"], continuation="{text}")
    task["modes"] = modes
    return task


def base_with_projectors(zoo: Zoo, model_seed: int):
    """The base LLM reading every modality of the zoo through the stage-1 projectors (no LoRA)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcomp.checkpoint import load_adapter_weights, read_config
    from mcomp.model import MultimodalLM

    paths = {m: zoo.model(m, "stage1", model_seed) for m in zoo.modalities}
    configs = [read_config(p).adapters[0] for p in paths.values()]
    model = MultimodalLM.build(
        AutoModelForCausalLM.from_pretrained(zoo.base), AutoTokenizer.from_pretrained(zoo.base), configs
    )
    for m, p in paths.items():
        load_adapter_weights(model, m, p)
    model.provenance = {"composition": {"method": "base", "merge": "-"}}
    return model.eval()


def compact_table(board) -> str:
    """Markdown: one row per model x method x merge backend; accuracy on MCUB-4 (with the inputs
    the model has) and each MCUB-3 subset, mean ± spread across seeds (n runs)."""
    from mcomp.benchmarks.mcub.leaderboard import _fmt

    columns = {}
    for col in board.columns:
        if col.metric != "accuracy":
            continue
        label = "MCUB-4" if col.task.startswith("mcub4") else f"MCUB-3 {col.subset}"
        columns.setdefault(label, []).append(col)
    order = ["MCUB-4"] + sorted(c for c in columns if c != "MCUB-4")
    lines = ["| model | method | merge | " + " | ".join(order) + " |", "|---" * (3 + len(order)) + "|"]
    for row in board.rows:
        cells = []
        for label in order:
            found = [board.cells[(row, c)] for c in columns.get(label, []) if (row, c) in board.cells]
            cells.append(_fmt(found[0]) if found else "-")
        lines.append(f"| {row.model} | {row.method} | {row.backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(
    size: str = "full",
    seed: int = 0,
    out_dir: str | Path = "runs/demo",
    mode: str = "loglik",
    root: str | Path | None = None,
    combos: dict | None = None,
    merges: dict | None = None,
    workers: int | None = None,
    modalities: list | None = None,
    llm_shape: str | None = None,
) -> dict:
    """Evaluation runs are jobs (`mcomp.jobs`, `workers` at a time), one per model. They are kept
    in the zoo cache (`evals/`, by model, task and mode: the zoo's models never change once built),
    so a second demo only gathers them; each is copied under `out_dir/runs/` next to the leaderboard."""
    from mcomp.benchmarks.mcub import leaderboard, leaderboard_page
    from mcomp.jobs import JobPool

    started = time.perf_counter()
    if modalities is not None:
        from mcomp.world.entities import world_modalities
        from mcomp.zoo.build import ZooSettings, world_config

        names = world_modalities(world_config(ZooSettings.for_size(size, llm_shape), modalities))
        if not set(ORDER) <= set(names):
            raise ValueError(
                f"the demo evaluates on MCUB, whose questions need the built-in modalities {list(ORDER)}; "
                f"got {list(names)} (add modalities to them)"
            )
    zoo = build_zoo(size, seed, root, workers, modalities=modalities, llm_shape=llm_shape)
    combos = dict(combos or COMBOS)
    if "image+audio+video+point" in combos and tuple(zoo.modalities) != ORDER:
        combos["+".join(zoo.modalities)] = tuple(zoo.modalities)  # the all-modality composition
        del combos["image+audio+video+point"]
    built = time.perf_counter()
    out = Path(out_dir)
    cache = zoo.root / "evals" / f"v{EVALS_VERSION}-{mode}"
    full_tasks = [cloze_task(name, cache) for name in ("mcub4", "mcub3")]
    reduced = {mods: reduced_task(zoo, mods, cache) for mods in [(m,) for m in ORDER] + [COMBOS["image+audio"]]}
    kept: list[tuple[Path, Path]] = []  # (run in the cache, its copy under out/runs)
    jobs: dict = {}
    reused = 0

    def add(spec: tuple, name: str, tasks: list[Path], tag: str):
        nonlocal reused
        todo = []
        for task in tasks:
            run_name = f"{tag}-{task.stem.replace('+', '_')}"
            kept.append((cache / run_name, out / "runs" / run_name))
            state = _cached_run(cache / run_name, task, job_identity(zoo, spec))
            if state == "done":
                reused += 1
            else:
                todo.append((str(task), str(cache / run_name), state == "stale"))
        if todo:
            jobs[tag] = (_eval_job, (zoo, spec, name, todo, mode))

    for s in zoo.settings.model_seeds:  # jobs with the most questions first
        for combo, mods in sorted(combos.items(), key=lambda c: -len(c[1])):
            tasks = full_tasks if set(ORDER) <= set(mods) else [reduced[mods]]
            for method in ("naivemc", "damc"):
                for merge, params in (merges or MERGES).items():
                    add(
                        ("compose", mods, method, merge, params, s),
                        combo,
                        tasks,
                        f"{combo.replace('+', '_')}-{method}-{merge}-s{s}",
                    )
        add(("base", s), "base LLM + stage-1 projectors", full_tasks, f"base-s{s}")
        for m in ORDER:  # an added modality has no MCUB questions: its held-out accuracy is in the summary
            add(("single", m, s), f"{m} model (own modality)", [reduced[(m,)]], f"single-{m}-s{s}")
    with JobPool(workers) as pool:
        pool.run(jobs, "demo: evaluation runs")
    logger.info("demo: %d evaluation run(s), %d reused from %s", len(kept) - reused, reused, cache)
    runs = [_copy_run(src, dst) for src, dst in kept]
    paths = leaderboard_page.write(runs, out, title=f"mcomp demo ({size}, seeds {zoo.settings.model_seeds})")
    paths["demo_markdown"] = out / "demo.md"
    note = (
        "Accuracy (%) on the synthetic MCUB test split; mean ± spread across model seeds (n runs), or "
        "± the standard error when there is one run.\n\n"
    )
    atomic_write_text(paths["demo_markdown"], note + compact_table(leaderboard.build(runs)))
    finished = time.perf_counter()
    summary = {
        "zoo": str(zoo.root),
        "leaderboard": {k: str(v) for k, v in paths.items()},
        "seconds_zoo": round(built - started, 1),
        "seconds_total": round(finished - started, 1),
        "runs_evaluated": len(kept) - reused,
        "runs_reused": reused,
        "held_out_accuracy": held_out_report(zoo.manifest),
    }
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    return summary


def demo_model(zoo: Zoo, spec: tuple):
    """The model an evaluation job runs: ("base", seed), ("single", modality, seed) or
    ("compose", modalities, method, merge, merge params, seed)."""
    import mcomp
    from mcomp.compose import compose

    kind, *rest = spec
    if kind == "base":
        return base_with_projectors(zoo, *rest)
    if kind == "single":
        modality, s = rest
        model = mcomp.load(zoo.model(modality, "naivemc", s))
        model.provenance = {"composition": {"method": "single", "merge": "-"}}
        return model
    mods, method, merge, params, s = rest
    return compose({m: zoo.model(m, method, s) for m in mods}, method=method, merge=merge, merge_params=params)


def job_identity(zoo: Zoo, spec: tuple) -> dict:
    """What determines a demo model: its spec (merge parameters included) and the zoo it is made of
    (whose steps are identity-checked when the zoo is opened)."""
    return {"demo_job": json.loads(json.dumps(spec)), "zoo_recipe": zoo.recipe, "zoo_seed": zoo.seed}


def _cached_run(run_dir: Path, task: Path, model: dict) -> str:
    """ "done" (a finished run of this very work), "new" (none, or an unfinished one of this work:
    evaluate resumes it) or "stale" (made by other work: redone from scratch, with a warning)."""
    from mcomp.benchmarks.mcub.tasks import load_task
    from mcomp.fingerprint import code_versions, differences, fingerprint

    if not (run_dir / "run.json").is_file():
        return "new"
    recorded = json.loads((run_dir / "run.json").read_text())
    wanted = {"model": model, "code": code_versions(), "task_config": fingerprint(load_task(task).raw)}
    changed = differences({k: recorded.get(k) for k in wanted}, wanted)
    if changed:
        logger.warning("redoing %s, which was made by other work (%s)", run_dir, "; ".join(changed[:4]))
        return "stale"
    return "done" if (run_dir / "results.json").is_file() else "new"


def _eval_job(zoo: Zoo, spec: tuple, name: str, runs: list[tuple[str, str, bool]], mode: str) -> None:
    from mcomp.benchmarks.mcub.runner import evaluate
    from mcomp.benchmarks.mcub.tasks import load_task

    model = demo_model(zoo, spec)
    data_root = zoo.world.mcub_root("test")  # `zoo.world` parses the world manifest (~5 MB) on each access
    for task, run_dir, stale in runs:
        evaluate(
            model,
            load_task(task),
            data_root,
            run_dir,
            mode=mode,
            feature_cache=zoo.root / "features",
            model_name=name,
            batch_size=EVAL_BATCH,
            model_identity=job_identity(zoo, spec),
            force=stale,
        )


def _copy_run(src: Path, dst: Path) -> Path:
    """The run's files (results, per-sample records, identity) under the demo's output folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("run.json", "samples.jsonl", "results.json"):
        shutil.copyfile(src / name, dst / name)
    return dst
