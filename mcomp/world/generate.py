"""`generate_world`: render every file of the world into a folder, atomically, with a manifest."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from mcomp.modalities import MODALITIES as MODALITY_TABLE
from mcomp.modalities import ORDER, Modality, read_modality_file
from mcomp.progress import progress_bar
from mcomp.resources import config_file, load_config
from mcomp.world.datasets import MCUB_DIR, MCUB_SUBSETS, MediaJob, world_plan
from mcomp.world.entities import (
    AttributeSpace,
    Entity,
    digest,
    entity_list,
    rng_for,
    split_entities,
    world_modalities,
)

logger = logging.getLogger(__name__)

WORLD_FORMAT = "mcomp-world"
WORLD_VERSION = "4"  # bump when the same seed and config would give different files
MANIFEST = "manifest.json"
SIZES = ("full", "test")
TEXT_FILES = {
    "commonality": "text/commonality.json",
    "attribute_qa": "text/attribute_qa.json",
    "modality_qa": "text/modality_qa.json",
    "sentences": "text/sentences.txt",
}
# the text corpora in conversation form, each sized by `text.<name>` in the world config (the
# sentences are sized from the commonality count)
CONVERSATION_CORPORA = ("commonality", "attribute_qa", "modality_qa")
LABELS = "labels.json"


# --- configuration ------------------------------------------------------------------------------
def _deep_update(base: dict, overrides: Mapping) -> dict:
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def load_world_config(size: str | os.PathLike = "full", overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved world config: `configs/world/<size>.yaml` (or a YAML file path) with its attribute
    file inlined under `attributes`, then `overrides` merged in (nested keys, e.g. {"mcub": {"test_questions": 50}})."""
    path = Path(size)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        base_dir = path.parent
    else:
        cfg = load_config("world", f"{size}.yaml")
        base_dir = config_file("world", f"{size}.yaml").parent
    cfg = copy.deepcopy(cfg)
    attributes = cfg.get("attributes", "attributes.yaml")
    if isinstance(attributes, str):
        local = base_dir / attributes
        if local.is_file():
            with open(local, encoding="utf-8") as f:
                attributes = yaml.safe_load(f)
        else:
            attributes = load_config("world", attributes)
    cfg["attributes"] = attributes
    if overrides:
        _deep_update(cfg, overrides)
    _check_config(cfg)
    return cfg


def _check_config(cfg: Mapping[str, Any]) -> None:
    from mcomp.world.render_audio import TIMBRES
    from mcomp.world.render_point import SHAPES

    for section in ("split", "render", "pretrain", "train", "val", "text", "mcub"):
        if section not in cfg:
            raise ValueError(f"world config: missing section {section!r}")
    space = AttributeSpace.from_config(cfg["attributes"])
    for s in space.shapes:
        if s.name not in SHAPES:
            raise ValueError(f"world config: shape {s.name!r} has no renderer (known: {', '.join(SHAPES)})")
        if s.timbre not in TIMBRES:
            raise ValueError(
                f"world config: shape {s.name!r} has unknown timbre {s.timbre!r} (known: {', '.join(TIMBRES)})"
            )
    from mcomp.world.renderers import renderer

    for m in world_modalities(cfg):
        renderer(m)  # raises, naming the modality, when none is registered
    for key in CONVERSATION_CORPORA:
        if key not in cfg["text"]:
            raise ValueError(f"world config: missing text.{key} (number of samples)")
    fraction = float(cfg["mcub"]["attribute_fraction"])
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"world config: mcub.attribute_fraction must be in [0, 1], got {fraction}")
    if cfg["train"]["samples_per_media"] < 1 or cfg["val"]["samples_per_media"] < 1:
        raise ValueError("world config: samples_per_media must be at least 1")


# --- manifest -----------------------------------------------------------------------------------
@dataclasses.dataclass
class WorldManifest:
    """What `generate_world` wrote. Paths in the fields are relative to `root`; the helpers return absolute ones."""

    root: Path
    version: str
    seed: int
    size: str
    config_digest: str
    config: dict[str, Any]
    entities: dict[str, list[str]]  # split -> entity keys ("red_cube")
    data: dict[str, Any]  # train/val: {modality: json}, text: {name: file}, mcub: {split: data root}, labels
    counts: dict[str, Any]
    files: dict[str, dict[str, Any]]  # relpath -> {"bytes", "sha256"}

    # paths
    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def train_json(self, modality: str) -> Path:
        """Training data of one modality (`mcomp train --data`; media resolve against its folder)."""
        return self.path(self.data["train"][modality])

    def val_json(self, modality: str) -> Path:
        """Held-out-entity (dev entities) questions for one modality, same format as training data."""
        return self.path(self.data["val"][modality])

    def pretrain_json(self, modality: str) -> Path:
        """Encoder pretraining renders of one modality (random colours): [{file, shape, rgb, pitch_hz}],
        files relative to its folder."""
        return self.path(self.data["pretrain"][modality])

    def text_file(self, name: str) -> Path:
        """`commonality` / `attribute_qa` / `modality_qa` (conversation JSON) or `sentences` (plain text lines)."""
        return self.path(self.data["text"][name])

    def mcub_root(self, split: str = "test") -> Path:
        """A data root for `mcomp eval --data-root` with the mcub4/mcub3 tasks (`data/test/MCUB-*.json`)."""
        return self.path(self.data["mcub"][split])

    def mcub_questions(self, split: str = "test", subset: str = "MCUB-4") -> Path:
        return self.mcub_root(split) / MCUB_DIR / f"{subset}.json"

    def mcub_answers(self, split: str = "test") -> Path:
        return self.mcub_root(split) / MCUB_DIR / "MCUB-answer.json"

    def mcub_meta(self, split: str = "test") -> Path:
        return self.mcub_root(split) / MCUB_DIR / "MCUB-meta.json"

    def entity_split(self, split: str) -> list[Entity]:
        return entity_list(self.entities[split])

    def labels(self) -> dict[str, str]:
        """Media relpath -> entity key, for every rendered file."""
        return json.loads(self.path(self.data["labels"]).read_text(encoding="utf-8"))

    # I/O
    def to_json(self) -> dict[str, Any]:
        out = {"format": WORLD_FORMAT}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "root"})
        return out

    @classmethod
    def load(cls, root: str | os.PathLike) -> "WorldManifest":
        root = Path(root)
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        if data.get("format") != WORLD_FORMAT:
            raise ValueError(f"{root / MANIFEST}: not a world manifest (format {data.get('format')!r})")
        data.pop("format")
        world_modalities(data.get("config", {}))  # the rows of added modalities, back in the table
        return cls(root=root, **data)

    def verify(self, hashes: bool = True) -> list[str]:
        """Problems found (missing files, wrong sizes, wrong sha256 if `hashes`); empty when intact."""
        problems = []
        for rel, info in self.files.items():
            p = self.root / rel
            if not p.is_file():
                problems.append(f"{rel}: missing")
            elif p.stat().st_size != info["bytes"]:
                problems.append(f"{rel}: {p.stat().st_size} bytes, expected {info['bytes']}")
            elif hashes and _sha256(p) != info["sha256"]:
                problems.append(f"{rel}: sha256 differs")
        return problems


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- rendering ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Renderer:
    root: str
    space: AttributeSpace
    settings: Mapping[str, Mapping[str, Any]]  # modality -> its render settings
    seed: int

    def __call__(self, job: MediaJob) -> str:
        from mcomp.world.renderers import Scene, renderer

        if job.colour_value is not None:
            colour_rgb, pitch_hz = job.colour_value
        else:
            colour = self.space.colour(job.entity.colour)
            colour_rgb, pitch_hz = colour.rgb, colour.pitch_hz
        scene = Scene(
            job.entity,
            self.space.shape(job.entity.shape),
            tuple(colour_rgb),
            float(pitch_hz),
            rng_for(self.seed, "media", job.relpath),
            self.settings[job.modality],
        )
        renderer(job.modality)(scene, os.path.join(self.root, job.relpath))
        return job.relpath


def with_modalities(cfg: Mapping[str, Any], modalities: Sequence[str | os.PathLike | Modality]) -> dict[str, Any]:
    """`cfg` rendering `modalities`: names in the table, modality files (read into the table) or rows.
    An added modality's row is kept in the config (`added_modalities`), so the world's identity and
    manifest carry it; the built-in four in their order leave the config as it was."""
    names, added = [], {}
    for item in modalities:
        if isinstance(item, Modality):
            row = item
        elif str(item).endswith((".yaml", ".yml", ".json")) or os.path.isfile(item):
            row = read_modality_file(item)
        elif str(item) in MODALITY_TABLE:
            row = MODALITY_TABLE[str(item)]
        else:
            raise ValueError(f"unknown modality {str(item)!r}: give a name in the table or a modality file")
        if row.name not in ORDER:
            if row.demo is None:
                raise ValueError(f"modality {row.name!r} has no 'demo' section: the world cannot render it")
            added[row.name] = row.to_dict()
        if row.name in names:
            raise ValueError(f"modality {row.name!r} is given twice")
        names.append(row.name)
    out = copy.deepcopy(dict(cfg))
    if tuple(names) != ORDER:
        out["modalities"] = names
    if added:
        out["added_modalities"] = added
    _check_config(out)
    return out


def render_settings(cfg: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Each modality's render settings: the config's `render` section for the built-in ones, a
    modality file's `demo.render` for an added one."""
    out = {}
    for m in world_modalities(cfg) + tuple(ORDER):
        demo = MODALITY_TABLE[m].demo
        out[m] = dict(cfg["render"]) if demo is None else dict(demo.get("render") or {})
    return out


def _render_all(jobs: list[MediaJob], renderer: _Renderer, workers: int, progress: bool) -> None:
    for folder in sorted({os.path.dirname(j.relpath) for j in jobs}):
        os.makedirs(os.path.join(renderer.root, folder), exist_ok=True)
    if workers <= 1:
        for job in progress_bar(jobs, desc="rendering world", unit="file", leave=False, enabled=progress):
            renderer(job)
        return
    # Threads, not processes: numpy, Pillow, PyAV and libsndfile release the GIL for most of the work
    # (about 1.5x on 2 cores), and threads need no pickling, no re-import of __main__ and no fork while
    # the caller runs torch. Each file has its own seed, so the result does not depend on scheduling.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in progress_bar(
            pool.map(renderer, jobs),
            total=len(jobs),
            desc="rendering world",
            unit="file",
            leave=False,
            enabled=progress,
        ):
            pass


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# --- the entry point ----------------------------------------------------------------------------
def generate_world(
    out_dir: str | os.PathLike,
    size: str = "full",
    seed: int = 0,
    *,
    overrides: Mapping[str, Any] | None = None,
    modalities: Sequence[str | os.PathLike | Modality] | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> WorldManifest:
    """Generate the synthetic world into `out_dir` and return its manifest.

    `size`: "full" or "test" (configs/world/<size>.yaml) or a path to a world YAML; `overrides`: nested
    config values to change; `modalities`: the modalities to render (default: the built-in four),
    each a name in the table, a modality file or a `Modality` (see `with_modalities`). Same seed +
    config -> byte-identical files. If `out_dir` already holds a
    complete world with the same version, seed and config it is reused (unless `force`); an existing world
    is otherwise replaced. A non-empty folder without a world manifest is never touched (FileExistsError).
    Files are written into a temporary sibling folder that replaces `out_dir` only when complete.
    `workers`: render threads (default: 1 for small worlds, else up to 2).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    cfg = load_world_config(size, overrides)
    if modalities is not None:
        cfg = with_modalities(cfg, modalities)
    size_name = Path(size).stem if str(size).endswith((".yaml", ".yml")) else str(size)
    config_digest = digest(cfg)
    if (out_dir / MANIFEST).is_file():
        try:
            existing = WorldManifest.load(out_dir)
        except (ValueError, TypeError, json.JSONDecodeError) as err:
            raise FileExistsError(
                f"{out_dir} has a {MANIFEST} that is not a world manifest ({err}); not replacing it"
            ) from None
        same = (existing.version, existing.seed, existing.config_digest) == (WORLD_VERSION, int(seed), config_digest)
        if same and not force and not existing.verify(hashes=False):
            logger.info("world in %s is up to date (seed %d, %s); reusing it", out_dir, seed, size_name)
            return existing
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} exists and is not a generated world (no {MANIFEST}); choose an empty or new folder"
        )

    space = AttributeSpace.from_config(cfg["attributes"])
    split = split_entities(space, int(cfg["split"]["dev_entities"]), int(cfg["split"]["test_entities"]), seed)
    plan = world_plan(space, split, cfg, seed)
    from mcomp.world.text import attribute_qa_samples, commonality_samples, modality_qa_samples, sentences

    samplers = {
        "commonality": commonality_samples,
        "attribute_qa": attribute_qa_samples,
        "modality_qa": modality_qa_samples,
    }
    for name in CONVERSATION_CORPORA:
        plan.documents[TEXT_FILES[name]] = samplers[name](space, int(cfg["text"][name]), rng_for(seed, "text", name))
    plan.documents[TEXT_FILES["sentences"]] = sentences(
        space, int(cfg["text"]["commonality"]) // 4, rng_for(seed, "text", "sentences")
    )
    # named entities only: the pretraining renders are listed with their colour values in pretrain/<m>.json
    plan.documents[LABELS] = {
        j.relpath: j.entity.key for j in sorted(plan.jobs, key=lambda j: j.relpath) if j.colour_value is None
    }
    if len({j.relpath for j in plan.jobs}) != len(plan.jobs):
        raise AssertionError("world plan: two media jobs share a path")

    if workers is None:
        workers = 1 if len(plan.jobs) < 1000 else min(2, os.cpu_count() or 1)
    if progress is None:
        progress = len(plan.jobs) >= 1000 and logger.isEnabledFor(logging.INFO)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _render_all(plan.jobs, _Renderer(str(tmp), space, render_settings(cfg), int(seed)), workers, progress)
        for rel, doc in plan.documents.items():
            if rel.endswith(".txt"):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_text("".join(line + "\n" for line in doc), encoding="utf-8")
            else:
                _write_json(tmp / rel, doc)
        files = {}
        for rel in sorted(list(plan.documents) + [j.relpath for j in plan.jobs]):
            p = tmp / rel
            files[rel] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        manifest = WorldManifest(
            root=out_dir,
            version=WORLD_VERSION,
            seed=int(seed),
            size=size_name,
            config_digest=config_digest,
            config=cfg,
            entities=split.to_json(),
            data={
                "train": {m: f"train/{m}.json" for m in world_modalities(cfg)},
                "val": {m: f"val/{m}.json" for m in world_modalities(cfg)},
                "pretrain": {m: f"pretrain/{m}.json" for m in world_modalities(cfg)},
                "text": dict(TEXT_FILES),
                "mcub": {s: f"mcub/{s}" for s in ("test", "dev")},
                "labels": LABELS,
            },
            counts=_counts(plan, cfg),
            files=files,
        )
        _write_json(tmp / MANIFEST, manifest.to_json())
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "generated world %s (seed %d): %d files in %.1f s -> %s",
        size_name,
        seed,
        len(files),
        time.perf_counter() - started,
        out_dir,
    )
    return manifest


def _swap_in(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _counts(plan, cfg) -> dict[str, Any]:
    media: dict[str, dict[str, int]] = {}
    for job in plan.jobs:
        group = job.relpath.split("/media/")[0]  # pretrain, train, val, mcub/test, mcub/dev
        media.setdefault(group, {}).setdefault(job.modality, 0)
        media[group][job.modality] += 1
    docs = plan.documents
    return {
        "media": media,
        "media_files": len(plan.jobs),
        "train_samples": {m: len(docs[f"train/{m}.json"]) for m in world_modalities(cfg)},
        "val_samples": {m: len(docs[f"val/{m}.json"]) for m in world_modalities(cfg)},
        "text": {k: len(docs[v]) for k, v in TEXT_FILES.items()},
        "mcub_questions": {
            s: {name: len(docs[f"mcub/{s}/{MCUB_DIR}/{name}.json"]) for name in MCUB_SUBSETS} for s in ("test", "dev")
        },
    }
