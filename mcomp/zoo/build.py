"""`mcomp zoo build`: the tiny model zoo behind the demo, built locally and cached.

    world/            the synthetic world (mcomp.world)
    base/             tiny base LLM pretrained on the world's text (transformers dir + tokenizer)
    encoders/<m>.safetensors   tiny encoders pretrained on the world's media, then frozen
    models/<m>-s<k>-{stage1,naivemc,damc}/   single-modality MLLMs trained with mcomp.train
    features/         encoder-feature cache shared by every training and evaluation
    zoo.json          what was built, with training figures and held-out accuracies

Every step writes its output atomically, with the identity of the work that made it (recipe,
seed, step, code versions: `Zoo.step_identity`), and is skipped when present with the same
identity, so an interrupted build resumes; an output of other work is refused. The cache key is
the zoo version, the size, the seed and the recipe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from mcomp import faults
from mcomp.checkpoint import CONFIG_NAME
from mcomp.configuration import JsonConfig
from mcomp.feature_cache import FeatureCache
from mcomp.fingerprint import IdentityMismatch, check_same_work, code_versions
from mcomp.io import atomic_directory, atomic_write_text
from mcomp.modalities import MODALITIES as MODALITY_TABLE
from mcomp.modalities import ORDER, add_modality
from mcomp.resources import load_config
from mcomp.tokenization import save_tokenizer

logger = logging.getLogger(__name__)

# 2: the world answers options with their text; 3: template-aware tokenizer, pooled video;
# 4: narrow point encoder, held-out accuracy by kind; 5: training runs the shared system prompt once a batch;
# 6: the base LLM also learns the modality questions in text form (world text/modality_qa.json);
# 7: stage 1 with caption distillation (stage1_caption_distill); 8: the world's eight colours (a config
# change, which alone would change the key; the version names the README's table); 9: the tiny ViT has
# 3 blocks of width 48 (2 of width 32 used 1: the adapter reads the penultimate block), 5 + 5 held-out
# entities, stage 2 longer for image, video and audio, video frames averaged in fours
# (changes to configs/zoo or configs/world change the cache key by themselves: recipe_digest)
ZOO_VERSION = 9
FLAVOURS = ("naivemc", "damc")
NOT_RECIPE = ("build_minutes",)  # settings that describe a zoo without changing what is built


@dataclasses.dataclass
class ZooSettings(JsonConfig):
    world_size: str = "test"
    llm_shape: str = "tiny-llama"
    vocab_size: int = 600
    llm_steps: int = 30
    encoder_steps: int | dict[str, int] = 20  # or per modality
    stage1_steps: int = 15
    stage2_steps: int | dict[str, int] = 15  # or per modality
    stage1_learning_rate: float = 3e-3  # the projector's
    stage1_caption_distill: float = 0.0  # TrainConfig.caption_distill of stage 1
    stage2_learning_rate: float = 2e-3  # LoRA and projector
    batch_size: int = 8  # base LLM and encoder pretraining
    model_batch_size: int | None = None  # stage 1 and stage 2 of the modality models (default: batch_size)
    model_seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    adapters: dict[str, dict] = dataclasses.field(default_factory=dict)  # adapter config overrides per modality
    build_minutes: float | None = None  # how long building it from nothing takes on 2 cores, as measured

    def steps_of_encoder(self, modality: str) -> int:
        return _of_modality(self.encoder_steps, modality)

    def steps_of_stage2(self, modality: str) -> int:
        return _of_modality(self.stage2_steps, modality)

    @classmethod
    def for_size(cls, size: str, llm_shape: str | None = None) -> "ZooSettings":
        """The zoo settings of `size` (configs/zoo/<size>.yaml), with another base LLM shape if given."""
        try:
            settings = cls.from_dict(load_config("zoo", f"{size}.yaml"), source=f"configs/zoo/{size}.yaml")
        except FileNotFoundError:
            raise ValueError(f"unknown zoo size {size!r} (configs/zoo/ has full and test)") from None
        if llm_shape is not None:
            load_config("llm", f"{llm_shape}.json")  # a shape that is not shipped fails here, named
            settings = dataclasses.replace(settings, llm_shape=llm_shape)
        return settings


def _of_modality(value: int | dict[str, int], modality: str) -> int:
    if not isinstance(value, dict):
        return int(value)
    if modality not in value:
        raise ValueError(f"zoo settings: no step count for modality {modality!r} in {value}")
    return int(value[modality])


def world_config(settings: ZooSettings, modalities: Sequence | None = None) -> dict:
    """The world a zoo trains on: its size's config, rendering `modalities` when given (names,
    modality files or rows; see `mcomp.world.generate.with_modalities`)."""
    from mcomp.world import load_world_config
    from mcomp.world.generate import with_modalities

    cfg = load_world_config(settings.world_size)
    return with_modalities(cfg, modalities) if modalities is not None else cfg


def recipe_digest(settings: ZooSettings, modalities: Sequence | None = None) -> str:
    """A short digest of what a zoo is built from: the zoo settings and the resolved world config
    (with the code versions of both). Editing configs/zoo or configs/world, or adding a modality,
    changes it."""
    from mcomp.world import WORLD_VERSION
    from mcomp.world.entities import digest

    return digest(
        {
            "zoo_version": ZOO_VERSION,
            "zoo": {k: v for k, v in settings.to_dict().items() if k not in NOT_RECIPE},
            "world_version": WORLD_VERSION,
            "world": world_config(settings, modalities),
        }
    )[:10]


def default_root(
    size: str, seed: int, recipe: str | None = None, modalities: Sequence | None = None, llm_shape: str | None = None
) -> Path:
    """Under the user cache directory (or $MCOMP_CACHE), keyed by version, size, seed and recipe
    (`recipe_digest` of the size's settings and `modalities` unless given)."""
    import platformdirs

    base = Path(os.environ.get("MCOMP_CACHE") or platformdirs.user_cache_dir("mcomp"))
    recipe = recipe or recipe_digest(ZooSettings.for_size(size, llm_shape), modalities)
    return base / "zoo" / f"v{ZOO_VERSION}-{size}-seed{seed}-{recipe}"


def tiny_adapter_config(modality: str, settings: ZooSettings, checkpoint: str | None = None):
    """The zoo's adapter config of `modality`: the tiny one of a built-in modality (`mcomp.tiny`), an
    added modality's `demo.adapter`; `checkpoint` holds the pretrained encoder's weights."""
    from mcomp import tiny
    from mcomp.modality import get_adapter_class

    overrides = dict(settings.adapters.get(modality, {}))
    if checkpoint:
        overrides["checkpoint"] = checkpoint
    demo = MODALITY_TABLE[modality].demo
    if demo is None:
        return getattr(tiny, f"tiny_{modality}_adapter_config")(**overrides)
    fields = {**demo["adapter"], **overrides}
    cls = get_adapter_class(fields["adapter"])
    return cls.config_class.from_dict(fields, source=f"modality {modality!r} demo.adapter")


STEP_FILE = "zoo_step.json"  # in the base LLM's folder; encoders keep it in metadata, models in provenance
STEP_KEY = "zoo_step"


@dataclasses.dataclass
class Zoo:
    root: Path
    settings: ZooSettings
    seed: int
    recipe: str = ""
    modalities: tuple[str, ...] = ORDER
    added_modalities: dict[str, dict] = dataclasses.field(default_factory=dict)  # rows of modality files

    def __post_init__(self) -> None:
        self.restore_rows()

    def restore_rows(self) -> None:
        """Put the added modalities' rows in the table (a worker process starts without them)."""
        for row in self.added_modalities.values():
            add_modality(row, f"zoo {self.root}")

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.restore_rows()

    def steps_of_encoder(self, modality: str) -> int:
        demo = MODALITY_TABLE[modality].demo
        if demo is not None and "encoder_steps" in demo:
            return int(demo["encoder_steps"])
        return self.settings.steps_of_encoder(modality)

    def steps_of_stage2(self, modality: str) -> int:
        demo = MODALITY_TABLE[modality].demo
        if demo is not None and "stage2_steps" in demo:
            return int(demo["stage2_steps"])
        return self.settings.steps_of_stage2(modality)

    def in_schedule_order(self, slowest_first: Sequence[str]) -> list[str]:
        """The zoo's modalities, the built-in ones in `slowest_first` order, then the added ones."""
        return [m for m in slowest_first if m in self.modalities] + [m for m in self.modalities if m not in ORDER]

    def step_identity(self, step: str) -> dict:
        """What determines a step's output: the recipe, the seed, the step and the code."""
        return {
            "step": step,
            "recipe": self.recipe or recipe_digest(self.settings),
            "seed": self.seed,
            "code": code_versions(),
        }

    def steps(self) -> list[tuple[str, Path]]:
        """Every step of a complete zoo with its output."""
        out = [("base", self.base)] + [(f"encoder-{m}", self.encoder(m)) for m in self.modalities]
        for s in self.settings.model_seeds:
            for m in self.modalities:
                out += [(p.name, p) for p in (self.model(m, f, s) for f in ("stage1", *FLAVOURS))]
        return out

    def reuse(self, step: str, path: Path) -> bool:
        """Whether step `step` is already built at `path`; an output of other work is refused."""
        if not path.exists():
            return False
        recorded = recorded_step(path)
        if recorded is None:
            raise IdentityMismatch(
                f"{path} records no zoo step identity (built by an older mcomp, or not by "
                f"the zoo); `mcomp zoo build --force` rebuilds this zoo"
            )
        check_same_work(str(path), recorded, self.step_identity(step), "`mcomp zoo build --force` rebuilds this zoo")
        return True

    @property
    def world(self):
        from mcomp.world import WorldManifest

        return WorldManifest.load(self.root / "world")

    @property
    def base(self) -> Path:
        return self.root / "base"

    def encoder(self, modality: str) -> Path:
        return self.root / "encoders" / f"{modality}.safetensors"

    def model(self, modality: str, flavour: str, model_seed: int) -> Path:
        return self.root / "models" / f"{modality}-s{model_seed}-{flavour}"

    @property
    def feature_cache(self) -> FeatureCache:
        return FeatureCache(self.root / "features")

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / "zoo.json").read_text())


def recorded_step(path: Path) -> dict | None:
    """The step identity a zoo output was written with (None if it has none)."""
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(STEP_KEY)
        return json.loads(text) if text else None
    if (path / STEP_FILE).is_file():
        return json.loads((path / STEP_FILE).read_text())
    if (path / CONFIG_NAME).is_file():
        return json.loads((path / CONFIG_NAME).read_text()).get("provenance", {}).get(STEP_KEY)
    return None


def build_zoo(
    size: str = "full",
    seed: int = 0,
    root: str | os.PathLike | None = None,
    workers: int | None = None,
    force: bool = False,
    modalities: Sequence | None = None,
    llm_shape: str | None = None,
) -> Zoo:
    """Build what is missing, `workers` jobs at a time (`mcomp.jobs`): the base LLM and an encoder
    per modality, then one job per modality and model seed (stage 1, then its plain and decoupled
    stage 2). `modalities`: the zoo's modalities (default: the built-in four), names, modality files
    or rows (a modality added by a file: docs/adding_a_modality.md). `llm_shape`: the base LLM's
    shape and architecture instead of the size's (`configs/llm/<shape>.json`, e.g. demo-qwen2).
    `force` discards whatever the folder holds and builds it anew."""
    from mcomp.jobs import JobPool
    from mcomp.world import generate_world
    from mcomp.world.entities import world_modalities

    settings = ZooSettings.for_size(size, llm_shape)
    world = world_config(settings, modalities)
    recipe = recipe_digest(settings, modalities)
    zoo = Zoo(
        Path(root) if root else default_root(size, seed, recipe),
        settings,
        seed,
        recipe,
        world_modalities(world),
        dict(world.get("added_modalities") or {}),
    )
    if force and zoo.root.exists():
        _discard(zoo.root)
    zoo.root.mkdir(parents=True, exist_ok=True)
    manifest_path = zoo.root / "zoo.json"
    if manifest_path.is_file():
        built = json.loads(manifest_path.read_text()).get("recipe")
        if built != recipe:
            raise ValueError(
                f"{manifest_path}: this zoo was built from another recipe ({built}, now {recipe}: "
                "configs/zoo or configs/world changed); build into a new folder"
            )
        missing = [path for step, path in zoo.steps() if not zoo.reuse(step, path)]
        if missing:
            raise FileNotFoundError(
                f"{manifest_path}: the zoo lacks {missing[0]} (and {len(missing) - 1} more); "
                f"`mcomp zoo build --force` rebuilds it"
            )
        logger.info("zoo cached at %s", zoo.root)
        return zoo
    took = f"about {settings.build_minutes:g} minutes on 2 cores" if settings.build_minutes else "a while"
    logger.warning("building the %s zoo (seed %d) at %s: %s, once; later runs reuse it", size, seed, zoo.root, took)
    generate_world(zoo.root / "world", size=settings.world_size, seed=seed, modalities=modalities)
    report: dict = {
        "version": ZOO_VERSION,
        "recipe": recipe,
        "size": size,
        "seed": seed,
        "settings": settings.to_dict(),
        "modalities": list(zoo.modalities),
        "encoders": {},
        "models": {},
    }
    # longest first: the base LLM, then the point and video encoders (measured slowest)
    first: dict = {} if zoo.reuse("base", zoo.base) else {"base": (_build_base, (zoo,))}
    first.update(
        {
            m: (_build_encoder, (zoo, m))
            for m in zoo.in_schedule_order(("point", "video", "audio", "image"))
            if not zoo.reuse(f"encoder-{m}", zoo.encoder(m))
        }
    )
    chains = {
        f"{m}-s{s}": (_build_models, (zoo, m, s))
        for s in settings.model_seeds
        for m in zoo.in_schedule_order(("video", "point", "audio", "image"))
    }
    with JobPool(workers) as pool:
        done = pool.run(first, "zoo: base LLM and encoders")
        if "base" in done:
            report["base_losses"] = done.pop("base")
        report["encoders"] = done
        report["models"] = pool.run(chains, "zoo: modality models")
    atomic_write_text(manifest_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return zoo


def _discard(root: Path) -> None:
    """Remove a zoo folder for `force`: only one that holds nothing but a zoo's own entries."""
    own = {"world", "base", "encoders", "models", "checkpoints", "features", "zoo.json"}
    foreign = sorted(p.name for p in root.iterdir() if p.name not in own and not p.name.startswith("."))
    if foreign:
        raise FileExistsError(f"{root} holds {foreign}, which a zoo does not write; not deleting it")
    logger.warning("discarding the zoo at %s (--force)", root)
    shutil.rmtree(root)


def _build_base(zoo: Zoo) -> dict:
    from mcomp.conversation import get_template
    from mcomp.model import MultimodalLM
    from mcomp.tiny import build_llm, build_tokenizer
    from mcomp.world import CONVERSATION_CORPORA

    world, settings, seed = zoo.world, zoo.settings, zoo.seed
    conversations = []
    for name in CONVERSATION_CORPORA:
        conversations += [s["conversations"] for s in json.loads(Path(world.text_file(name)).read_text())]
    sentences = [line for line in Path(world.text_file("sentences")).read_text().splitlines() if line.strip()]
    corpus = sentences + [t["value"] for c in conversations for t in c if t.get("value")]
    for modality in zoo.modalities:
        corpus += [
            t["value"]
            for s in json.loads(Path(world.train_json(modality)).read_text())
            for t in s["conversations"]
            if t.get("value")
        ]
    # The tokenizer learns from the text as the models read it: rendered in the chat template, whose
    # system prompt starts every sample. Trained on the bare messages, it spelled that prompt in 107
    # pieces, most of every training and evaluation sequence (a real Llama tokenizer needs ~35).
    template = get_template("vicuna_v1")
    rendered = [template.render([(t["from"], t.get("value")) for t in c]) for c in conversations]
    tokenizer = build_tokenizer(corpus + rendered, vocab_size=settings.vocab_size)
    llm = build_llm(tokenizer, settings.llm_shape, seed=seed)
    from mcomp.zoo.pretrain import pretrain_llm

    losses = pretrain_llm(
        MultimodalLM(llm, tokenizer, []),
        conversations,
        sentences,
        settings.llm_steps,
        batch_size=settings.batch_size,
        seed=seed,
    )
    with atomic_directory(zoo.base) as tmp:
        llm.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        (tmp / STEP_FILE).write_text(json.dumps(zoo.step_identity("base"), indent=2, sort_keys=True) + "\n")
    faults.point("zoo.step_done")
    return {"first": losses[0], "last": sum(losses[-10:]) / len(losses[-10:])}


PITCH_BINS = 16


def colour_target(modality: str) -> str:
    """What encoder pretraining regresses as the colour: "rgb", or "pitch" (audio's colour)."""
    demo = MODALITY_TABLE[modality].demo
    if demo is not None:
        return demo.get("colour_target", "rgb")
    return "pitch" if modality == "audio" else "rgb"


def _colour_values(target: str, items: list[dict]) -> torch.Tensor:
    """The colour each pretraining render shows, as targets in [0, 1]: RGB, or for audio the pitch
    as a population code (Gaussian bumps over PITCH_BINS log-spaced centres). Why the code: fitted
    as one number, pitch came out of the frozen audio encoder as a single ordered feature, and a
    linear probe named held-out entities' pitches no better than chance (19%)."""
    if target == "rgb":
        return torch.tensor([it["rgb"] for it in items], dtype=torch.float32) / 255.0
    pitch = torch.tensor([it["pitch_hz"] for it in items], dtype=torch.float64).log()
    centres = torch.linspace(float(pitch.min()), float(pitch.max()), PITCH_BINS, dtype=torch.float64)
    width = float(centres[1] - centres[0])
    return torch.exp(-0.5 * ((pitch[:, None] - centres[None]) / width) ** 2).float()


def _build_encoder(zoo: Zoo, modality: str) -> dict:
    """Pretrained on the world's random-colour renders (shape class, colour value), then frozen."""
    from mcomp.modality import build_adapter
    from mcomp.world import AttributeSpace
    from mcomp.zoo.pretrain import pretrain_encoder

    world, settings, seed = zoo.world, zoo.settings, zoo.seed
    space = AttributeSpace.from_config(world.config["attributes"])
    items = json.loads(world.pretrain_json(modality).read_text())
    files = [str(world.pretrain_json(modality).parent / it["file"]) for it in items]
    torch.manual_seed(seed)
    adapter = build_adapter(tiny_adapter_config(modality, settings), llm_hidden_size=8)
    zoo.encoder(modality).parent.mkdir(parents=True, exist_ok=True)
    figures = pretrain_encoder(
        adapter,
        files,
        [space.shape_names.index(it["shape"]) for it in items],
        _colour_values(colour_target(modality), items),
        len(space.shapes),
        zoo.steps_of_encoder(modality),
        zoo.encoder(modality),
        batch_size=settings.batch_size,
        seed=seed,
        metadata={STEP_KEY: json.dumps(zoo.step_identity(f"encoder-{modality}"), sort_keys=True)},
    )
    faults.point("zoo.step_done")
    return figures


def _build_models(zoo: Zoo, modality: str, model_seed: int) -> dict:
    """Stage 1 (projector), then stage 2 from it: plain (NaiveMC) and decoupled (DAMC)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mcomp
    from mcomp.data import load_conversation_data
    from mcomp.model import MultimodalLM
    from mcomp.train import TrainConfig, train

    world, settings = zoo.world, zoo.settings
    samples = load_conversation_data(world.train_json(modality))
    out = {}
    stage1 = zoo.model(modality, "stage1", model_seed)
    common = dict(batch_size=settings.model_batch_size or settings.batch_size, seed=model_seed, log_every=0)
    if not zoo.reuse(stage1.name, stage1):
        llm = AutoModelForCausalLM.from_pretrained(zoo.base)
        tokenizer = AutoTokenizer.from_pretrained(zoo.base)
        model = MultimodalLM.build(
            llm, tokenizer, [tiny_adapter_config(modality, settings, str(zoo.encoder(modality)))], seed=model_seed
        )
        model.feature_cache = zoo.feature_cache
        cfg = TrainConfig(
            stage=1,
            max_steps=settings.stage1_steps,
            learning_rate=settings.stage1_learning_rate,
            caption_distill=settings.stage1_caption_distill,
            **common,
        )
        out["stage1"] = train(
            model,
            samples,
            cfg,
            zoo.root / "checkpoints" / stage1.name,
            identity={"zoo_step": zoo.step_identity(stage1.name)},
        )["final_loss"]
        _save_step(zoo, model, stage1)
    for flavour in FLAVOURS:
        path = zoo.model(modality, flavour, model_seed)
        if zoo.reuse(path.name, path):
            continue
        model = mcomp.load(stage1)
        model.feature_cache = zoo.feature_cache
        cfg = TrainConfig(
            stage=2,
            decoupled=flavour == "damc",
            lora_r=8,
            lora_alpha=16,
            learning_rate=settings.stage2_learning_rate,
            max_steps=zoo.steps_of_stage2(modality),
            **common,
        )
        out[flavour] = train(
            model,
            samples,
            cfg,
            zoo.root / "checkpoints" / path.name,
            identity={"zoo_step": zoo.step_identity(path.name)},
        )["final_loss"]
        out[f"{flavour}_val_accuracy"], out[f"{flavour}_val_by_kind"] = held_out_accuracy(model, world, modality)
        _save_step(zoo, model, path)
    return out


def _save_step(zoo: Zoo, model, path: Path) -> None:
    model.provenance = {**model.provenance, STEP_KEY: zoo.step_identity(path.name)}
    model.save_pretrained(path)
    faults.point("zoo.step_done")


def held_out_report(manifest: dict) -> dict[str, dict]:
    """Per modality model (e.g. "image-s0"), its held-out accuracies from a zoo manifest, rounded:
    `<flavour>_val_accuracy` and `<flavour>_val_by_kind` ({"colour": ..., "object": ..., "shape": ...})."""

    def rounded(value):
        return {k: round(v, 3) for k, v in value.items()} if isinstance(value, dict) else round(value, 3)

    return {
        name: {k: rounded(v) for k, v in figures.items() if k.endswith(("_val_accuracy", "_val_by_kind"))}
        for name, figures in manifest["models"].items()
    }


def held_out_accuracy(model, world, modality: str, batch_size: int = 16) -> tuple[float, dict[str, float]]:
    """Accuracy on the four-option questions about held-out (dev) entities, overall and by what is
    asked ("object", "colour", "shape"): the option whose text has the highest log-likelihood as the
    answer (the world's cloze formulation)."""
    from collections import Counter

    from mcomp.data import load_conversation_data
    from mcomp.model import LoglikelihoodRequest
    from mcomp.world.questions import parse_options

    questions = []
    for s in load_conversation_data(world.val_json(modality)):
        prompt = s.conversations[0]["value"]
        options = parse_options(prompt)
        if len(options) >= 2:
            kind = prompt.splitlines()[1].split()[1]  # "What colour is ...", "What object does ..."
            questions.append(
                (
                    LoglikelihoodRequest(model.template.prompt(prompt), options, s.media),
                    s.conversations[-1]["value"],
                    kind,
                )
            )
    correct, asked = Counter(), Counter()
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        for (request, answer, kind), scores in zip(chunk, model.loglikelihood_batch([q for q, _, _ in chunk])):
            best = max(range(len(scores)), key=lambda i: scores[i].logprob)
            asked[kind] += 1
            correct[kind] += request.continuations[best] == answer
    overall = sum(correct.values()) / max(sum(asked.values()), 1)
    return overall, {kind: correct[kind] / asked[kind] for kind in sorted(asked)}
