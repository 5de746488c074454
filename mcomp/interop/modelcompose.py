"""Import a released ModelCompose checkpoint folder into an mcomp model directory.

A released folder (HF `Adu2021/ModelCompose`, e.g. `multimodal-vicuna-7b-v1.5-vision-damc`) holds
`config.json` and `adapter_model.bin` (or `mm_projector.bin`): a plain pickle of every trainable tensor
under its module name (spec modelcompose.md §1-2):

    model.layers.L.{self_attn,mlp}.P.lora_{A,B}.<adapter>.weight   LoRA: `default` (text) and, for DAMC, the
                                                                   modality adapter (`vision`, `audio`, ...)
    model.modal_projectors.<m>.*                                   projector (mlp2x_gelu or the audio Q-Former)
    prefix_tokens.<m> / suffix_tokens.<m>  [1, n, hidden]          DAMC modality tokens (`default` ones unused)

mcomp equivalents: LoRA `default` -> adapter `text`, the modality adapter -> the mcomp modality name
(`vision` -> `image`), each in peft format under `lora/<name>/`; projectors -> `projectors.safetensors`
(`<modality>.<param>`); tokens -> `modality_tokens.safetensors` ([n, hidden]); routes: NaiveMC (`same`)
sends every token through `text`; DAMC (`modal`/`modal+language`) sends modality tokens (prefix and suffix
included) through their own adapter and text through `text` (spec §3.4-3.5). Scaling is alpha/r from
the config (128/256 released).

Everything is decided from `config.json` fields, never from the folder name: the LoRA strategy
(`lora_strategy`; the released point folders were trained by each other's scripts, spec §3.6), the
number of modality tokens (`local_prefix_tokens`, `local_<m>_prefix_tokens`), the feature layer
(`mm_vision_select_layer`, `mm_video_select_layer`), projector types and the encoders. Absolute
encoder paths of the authors' cluster are remapped by basename under `encoder_root`.

A released *merged* folder (the output of `merge_unimodal_modelcompose.py --strategy
online-merge-reset-...`: several `mm_*_encoder`s, adapters `default-<m>`, `reset_scaling_weights`) is
accepted too and becomes a composed mcomp model whose text route is sum_m lambda_m (alpha/r) B_m A_m.

`.bin` files are read with `torch.load(weights_only=True)` only (`mcomp.io.load_tensors`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mcomp.configuration import parse_pairs
from mcomp.encoders.weights import read_json
from mcomp.io import atomic_directory, check_state_dict, load_tensors, save_tensors, sha256_file
from mcomp.lora import LLAMA_TARGETS, TEXT_ROUTE, LoraSpec
from mcomp.modalities import MODALITIES
from mcomp.peft_format import write_adapter
from mcomp.tokenization import save_tokenizer

if TYPE_CHECKING:
    from mcomp.output_record import OutputRecord

logger = logging.getLogger(__name__)

FORMAT = "modelcompose"
UPSTREAM_TEXT = "default"
TO_MCOMP = {m.published_key: m.name for m in MODALITIES.values()}  # released modality key -> mcomp modality
WEIGHT_FILES = ("adapter_model.bin", "adapter_model.safetensors", "mm_projector.bin")
EXTRA_WEIGHT_FILE = "non_lora_trainables.bin"
MASKED_STRATEGIES = ("modal", "modal+language")
FLAVOURS = {"same": "naivemc", "modal+language": "damc", "modal": "modal-only", None: "no-lora", "none": "no-lora"}
ENCODER_WEIGHTS_DIR = "encoder_weights"

# Published constants that are not stored in the released files.
AUDIO_TARGET_FRAMES = 1024  # fbank frames (spec §6.2)
POINT_NUM_POINTS = 8192  # points per cloud (spec §6.4)
POINT_NUM_GROUP, POINT_GROUP_SIZE = 512, 32  # PointTransformer_8192point_2layer.yaml
HEAD_WIDTH = 64  # bert-base (768/12) and Point-BERT (384/6): heads = width / 64

LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(model\.layers\.\d+\.(?:self_attn|mlp)\.([a-z_]+))\.lora_([AB])\.([^.]+)\.weight$"
)
PROJECTOR_KEY = re.compile(r"^model\.modal_projectors\.([^.]+)\.(.+)$")
TOKEN_KEY = re.compile(r"^(prefix|suffix)_tokens\.(.+)$")


# --- reading the released folder -------------------------------------------------------------
def infer_modals(cfg: dict[str, Any]) -> list[str]:
    """Upstream modality names in upstream order (spec §2 `infer_modals`, without `default`)."""
    out = []
    if cfg.get("mm_audio_encoder") is not None:
        out.append("audio")
    if cfg.get("mm_vision_encoder") is not None or cfg.get("mm_vision_tower") is not None:
        out.append("vision")
    if cfg.get("mm_video_encoder"):
        out.append("video")
    if cfg.get("mm_point_encoder"):
        out.append("point")
    return out


@dataclasses.dataclass
class ReleasedCheckpoint:
    """What a released folder holds, classified (nothing converted yet)."""

    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    modalities: list[str]  # upstream names, upstream order
    strategy: str | None
    lora: dict[str, dict[str, dict[str, torch.Tensor]]]  # adapter -> module path -> {"A", "B"}
    projectors: dict[str, dict[str, torch.Tensor]]  # upstream modality -> param -> tensor
    tokens: dict[str, dict[str, torch.Tensor]]  # "prefix"/"suffix" -> upstream name -> [1, n, H]
    reset_weights: dict[str, float]

    @property
    def flavour(self) -> str:
        if self.merged:
            return f"merged-{FLAVOURS.get(self.strategy, self.strategy)}"
        return FLAVOURS.get(self.strategy, str(self.strategy))

    @property
    def masked(self) -> bool:
        """Modality tokens go through their own adapter (DAMC); otherwise every token uses `default`."""
        return self.strategy in MASKED_STRATEGIES

    @property
    def merged(self) -> bool:
        return any(k.startswith(UPSTREAM_TEXT + "-") for k in self.reset_weights) or len(self.modalities) > 1

    def token_count(self, kind: str, modality: str) -> int:
        specific = self.config.get(f"local_{modality}_{kind}_tokens")
        n = specific if specific is not None else self.config.get(f"local_{kind}_tokens")
        return int(n or 0)


def read_released(path: str | os.PathLike) -> ReleasedCheckpoint:
    """Read and classify a released folder; every tensor must be recognised."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"released checkpoint folder not found: {path}")
    cfg_path = path / "config.json"
    cfg = read_json(cfg_path, "released ModelCompose config")
    if cfg.get("model_type") not in ("multimodal", "llama", None):
        logger.warning("%s: model_type %r (released checkpoints say 'multimodal')", cfg_path, cfg.get("model_type"))
    if any(k.startswith("mm_vision2") and cfg[k] for k in cfg):
        raise ValueError(f"{cfg_path}: a second vision encoder (mm_vision2_*) is not supported")
    modalities = infer_modals(cfg)
    if not modalities:
        raise ValueError(
            f"{cfg_path}: no modality encoder configured (none of mm_vision_encoder, mm_vision_tower, "
            f"mm_audio_encoder, mm_video_encoder, mm_point_encoder is set)"
        )
    strategy = cfg.get("lora_strategy")
    if strategy not in FLAVOURS:
        raise ValueError(f"{cfg_path}: lora_strategy {strategy!r} is not one of {sorted(k for k in FLAVOURS if k)}")
    reset = parse_pairs(cfg.get("reset_scaling_weights"), f"{cfg_path}: reset_scaling_weights", float)
    if cfg.get("merge_default_weights") and not reset:
        raise ValueError(
            f"{cfg_path}: merge_default_weights={cfg['merge_default_weights']!r} without reset_scaling_weights: "
            f"upstream never reads this field, drops the renamed text LoRA and runs the base LLM for text tokens "
            f"(spec §3.6). Re-merge with an 'online-merge-reset-...' strategy, or import the single-modality "
            f"folders and use `mcomp compose`"
        )
    weight_file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weight_file is None:
        raise FileNotFoundError(f"{path}: no weights (looked for {', '.join(WEIGHT_FILES)})")
    tensors = dict(_read_weights(weight_file))
    files = [weight_file]
    if (path / EXTRA_WEIGHT_FILE).is_file():  # the loader reads it when present (spec §1.1)
        extra = _read_weights(path / EXTRA_WEIGHT_FILE)
        extra = {(k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in extra.items()}
        if any(k.startswith("model.model.") for k in extra):
            extra = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in extra.items()}
        tensors.update(extra)
        files.append(path / EXTRA_WEIGHT_FILE)

    lora: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    projectors: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, dict[str, torch.Tensor]] = {"prefix": {}, "suffix": {}}
    unknown = []
    for key, value in tensors.items():
        if (m := LORA_KEY.match(key)) and m.group(2) in LLAMA_TARGETS:
            lora.setdefault(m.group(4), {}).setdefault(m.group(1), {})[m.group(3)] = value
        elif m := PROJECTOR_KEY.match(key):
            projectors.setdefault(m.group(1), {})[m.group(2)] = value
        elif m := TOKEN_KEY.match(key):
            tokens[m.group(1)][m.group(2)] = value
        else:
            unknown.append(key)
    if unknown:
        unknown.sort()
        raise ValueError(
            f"{weight_file}: {len(unknown)} tensor(s) of unknown role (not LoRA, projector or modality "
            f"tokens): {', '.join(unknown[:10])}"
        )
    stray = sorted(set(projectors) - set(modalities))
    if stray:
        raise ValueError(
            f"{weight_file}: projector weights for {stray}, which {cfg_path} does not configure "
            f"(configured: {modalities})"
        )
    return ReleasedCheckpoint(path, cfg, files, modalities, strategy, lora, projectors, tokens, reset)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_tensors(path)  # safetensors, or a pickle through weights_only=True only
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return tensors


# --- plan: adapters, routes, tokens ----------------------------------------------------------
@dataclasses.dataclass
class LoraPlan:
    adapters: dict[str, str]  # upstream adapter name -> mcomp adapter name (those that are used)
    routes: dict[str, list[tuple[str, float]]]
    ignored: list[str]  # upstream adapters present in the file but never used at runtime


def plan_lora(ckpt: ReleasedCheckpoint) -> LoraPlan:
    """Which LoRA adapters are used and how tokens are routed, from the config (spec §3.4-3.5)."""
    src = ckpt.path / "config.json"
    present = set(ckpt.lora)
    adapters: dict[str, str] = {}
    routes: dict[str, list[tuple[str, float]]] = {}
    used: set[str] = set()
    if ckpt.strategy in (None, "none"):
        ignored = sorted(present)
        if ignored:
            logger.warning(
                "%s: lora_strategy is %r, so LoRA adapters %s are not used (as upstream)", src, ckpt.strategy, ignored
            )
        return LoraPlan({}, {}, ignored)
    # text tokens
    if ckpt.merged and any(k.startswith(UPSTREAM_TEXT + "-") for k in ckpt.reset_weights):
        text_terms = []
        for m in ckpt.modalities:
            name = f"{UPSTREAM_TEXT}-{m}"
            lam = ckpt.reset_weights.get(name, 1.0)
            if name not in present:
                logger.warning("%s: no weights for text adapter %r: it contributes nothing (B = 0 upstream)", src, name)
                continue
            adapters[name] = f"{TEXT_ROUTE}-{TO_MCOMP[m]}"
            text_terms.append((adapters[name], lam))
            used.add(name)
        if UPSTREAM_TEXT in present:
            logger.warning("%s: the plain 'default' LoRA is unused in a reset-merged model (spec §3.4); ignored", src)
    else:
        if UPSTREAM_TEXT not in present and ckpt.strategy != "modal":
            raise ValueError(
                f"{ckpt.weight_files[0]}: lora_strategy {ckpt.strategy!r} uses LoRA adapter 'default' "
                f"for text tokens, but the file has no 'lora_A.default' weights"
            )
        text_terms = []
        if UPSTREAM_TEXT in present:
            adapters[UPSTREAM_TEXT] = TEXT_ROUTE
            text_terms.append((TEXT_ROUTE, ckpt.reset_weights.get(UPSTREAM_TEXT, 1.0)))
            used.add(UPSTREAM_TEXT)
    if text_terms:
        routes[TEXT_ROUTE] = text_terms
    # modality tokens
    if ckpt.masked:
        for m in ckpt.modalities:
            if m not in present:
                raise ValueError(
                    f"{ckpt.weight_files[0]}: lora_strategy {ckpt.strategy!r} routes {m} tokens through "
                    f"LoRA adapter {m!r}, but the file has no 'lora_A.{m}' weights"
                )
            adapters[m] = TO_MCOMP[m]
            routes[TO_MCOMP[m]] = [(TO_MCOMP[m], ckpt.reset_weights.get(m, 1.0))]
            used.add(m)
    for key in ckpt.reset_weights:
        if key not in present and key not in (UPSTREAM_TEXT,):
            logger.warning("%s: reset_scaling_weights names %r, which has no weights; ignored (as upstream)", src, key)
    ignored = sorted(present - used)
    if ignored:
        logger.warning(
            "%s: LoRA adapter(s) %s are in the file but unused with lora_strategy %r (as upstream); not imported",
            src,
            ignored,
            ckpt.strategy,
        )
    return LoraPlan(adapters, routes, ignored)


def expected_lora_shapes(llm, r: int) -> dict[str, dict[str, tuple[int, int]]]:
    """module path -> {"A": [r, in], "B": [out, r]} for every targeted linear layer of the LLM."""
    out = {}
    for path, module in llm.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and path.rsplit(".", 1)[-1] in LLAMA_TARGETS
            and path.startswith("model.layers.")
        ):
            out[path] = {"A": (r, module.in_features), "B": (module.out_features, r)}
    return out


def check_lora(ckpt: ReleasedCheckpoint, plan: LoraPlan, llm, r: int) -> None:
    expected = expected_lora_shapes(llm, r)
    for name in plan.adapters:
        want = {f"{p}.lora_{k}.{name}.weight": s for p, ab in expected.items() for k, s in ab.items()}
        got = {f"{p}.lora_{k}.{name}.weight": t for p, ab in ckpt.lora[name].items() for k, t in ab.items()}
        check_state_dict(want, got, ckpt.weight_files[0], f"LoRA adapter {name!r} (r={r} from config.json lora_r)")


# --- encoders ---------------------------------------------------------------------------------
def resolve_path(value: Any, field: str, source: Path, roots: list[Path]) -> Path:
    """An encoder path from a released config: `<root>/<basename>` for each root, then the path as given."""
    if not value or not isinstance(value, str):
        raise ValueError(f"{source}: {field} is {value!r}; expected the encoder's path")
    original = Path(value)
    candidates = []
    for root in roots:
        candidates += [root / original.name]
        if not original.is_absolute():
            candidates.append(root / original)
    candidates.append(original)
    for c in candidates:
        if c.exists():
            return c.resolve()
    hint = f"put {original.name!r} under --encoder-root" if roots else "pass --encoder-root DIR holding it"
    raise FileNotFoundError(
        f"{source}: {field} = {value!r} not found (looked at: {', '.join(map(str, candidates))}); {hint}"
    )


def _field(cfg: dict[str, Any], name: str, source: Path, default: Any = None, required: bool = False) -> Any:
    if cfg.get(name) is None:
        if required:
            raise ValueError(f"{source}: field {name!r} is missing")
        return default
    return cfg[name]


def build_adapter_configs(
    ckpt: ReleasedCheckpoint, roots: list[Path], weights_dir: Path, final_weights_dir: Path
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(adapter configs pointing into weights_dir, the same pointing into final_weights_dir, encoder report)."""
    from mcomp.encoders.audio import AudioAdapterConfig
    from mcomp.encoders.image import ImageAdapterConfig
    from mcomp.encoders.languagebind import LanguageBindVideoAdapterConfig, tower_config_from_hf
    from mcomp.encoders.point import PointAdapterConfig
    from mcomp.interop.clip_weights import write_open_clip_tower

    cfg, src = ckpt.config, ckpt.path / "config.json"
    now, final, report = [], [], {}
    for m in ckpt.modalities:
        if m == "vision":
            field = "mm_vision_encoder" if cfg.get("mm_vision_encoder") else "mm_vision_tower"
            enc = resolve_path(cfg.get(field), field, src, roots)
            name = f"{enc.name}.open_clip.safetensors"
            weights_dir.mkdir(parents=True, exist_ok=True)
            tower_cfg = write_open_clip_tower(enc, weights_dir / name)
            select = _field(cfg, "mm_vision_select_feature", src, "patch")
            if select not in ("patch", "cls_patch"):
                raise ValueError(f"{src}: mm_vision_select_feature {select!r} is not 'patch' or 'cls_patch'")
            fields = dict(
                tower=enc.name,
                tower_config=tower_cfg,
                select_layer=int(_field(cfg, "mm_vision_select_layer", src, required=True)),
                select_feature=select,
                image_aspect_ratio="pad",  # evaluation hard-codes pad (§2)
                projector_type=_field(cfg, "mm_projector_type", src, "linear"),
            )
            now.append(ImageAdapterConfig(checkpoint=str(weights_dir / name), **fields).to_dict())
            final.append(ImageAdapterConfig(checkpoint=str(final_weights_dir / name), **fields).to_dict())
            hidden_field = "mm_hidden_size"
        elif m == "audio":
            enc = resolve_path(cfg.get("mm_audio_encoder"), "mm_audio_encoder", src, roots)
            ptype = _field(cfg, "mm_audio_projector_type", src, required=True)
            fields: dict[str, Any] = dict(checkpoint=str(enc), projector_type=ptype, target_length=AUDIO_TARGET_FRAMES)
            proj = ckpt.projectors.get("audio", {})
            if ptype.startswith("qformer_") and "audio_query_tokens" in proj:
                hidden = int(proj["audio_query_tokens"].shape[-1])
                if hidden % HEAD_WIDTH:
                    raise ValueError(
                        f"{ckpt.weight_files[0]}: Q-Former width {hidden} is not a multiple of {HEAD_WIDTH}"
                    )
                fields.update(qformer_hidden_size=hidden, qformer_num_heads=hidden // HEAD_WIDTH)
                key = "audio_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"
                if key in proj:
                    fields["qformer_intermediate_size"] = int(proj[key].shape[0])
                if "audio_position_embedding.weight" in proj:
                    fields["qformer_max_positions"] = int(proj["audio_position_embedding.weight"].shape[0])
            now.append(AudioAdapterConfig(**fields).to_dict())
            final.append(AudioAdapterConfig(**fields).to_dict())
            hidden_field = "mm_audio_hidden_size"
        elif m == "video":
            enc = resolve_path(cfg.get("mm_video_encoder"), "mm_video_encoder", src, roots)
            if not str(cfg.get("mm_video_encoder")).rstrip("/").endswith("LanguageBind_Video_merge"):
                logger.warning(
                    "%s: mm_video_encoder %r does not end with LanguageBind_Video_merge (upstream requires "
                    "it); loading it as a LanguageBind video tower",
                    src,
                    cfg.get("mm_video_encoder"),
                )
            if not enc.is_dir():
                raise ValueError(f"{src}: mm_video_encoder resolves to {enc}, which is not a LanguageBind directory")
            tower_cfg = tower_config_from_hf(read_json(enc / "config.json", "LanguageBind config"), str(enc))
            layer = cfg.get("mm_video_select_layer")
            if layer is None:
                logger.warning("%s: mm_video_select_layer missing; using -2 (the released training scripts)", src)
                layer = -2
            fields = dict(
                tower_config=tower_cfg,
                checkpoint=str(enc),
                select_layer=int(layer),
                num_frames=int(tower_cfg["num_frames"]),
                projector_type=_field(cfg, "mm_video_projector_type", src, required=True),
            )
            now.append(LanguageBindVideoAdapterConfig(**fields).to_dict())
            final.append(LanguageBindVideoAdapterConfig(**fields).to_dict())
            hidden_field = "mm_video_hidden_size"
        else:  # point
            enc = resolve_path(cfg.get("mm_point_encoder"), "mm_point_encoder", src, roots)
            fields = dict(
                encoder=point_bert_config(enc),
                checkpoint=str(enc),
                num_points=POINT_NUM_POINTS,
                normalization="none",  # pc_norm is never called upstream (§6.4)
                projector_type=_field(cfg, "mm_point_projector_type", src, required=True),
            )
            now.append(PointAdapterConfig(**fields).to_dict())
            final.append(PointAdapterConfig(**fields).to_dict())
            hidden_field = "mm_point_hidden_size"
        enc_field = field if m == "vision" else f"mm_{m}_encoder"
        report[TO_MCOMP[m]] = {
            "field": enc_field,
            "released_path": cfg.get(enc_field),
            "resolved": str(enc),
            "hidden_size_field": hidden_field,
            "hidden_size": cfg.get(hidden_field),
        }
    return now, final, report


def point_bert_config(path: Path) -> dict[str, Any]:
    """Point-BERT shape from its weights (heads: width / 64; groups: the published 512 x 32)."""
    from mcomp.encoders.pointbert import PointBertConfig, read_pointbert_state

    state = read_pointbert_state(path)
    needed = ("cls_token", "reduce_dim.weight", "encoder.first_conv.0.weight", "blocks.blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"{path}: not a Point-BERT state dict (missing {missing})")
    width = int(state["cls_token"].shape[-1])
    if width % HEAD_WIDTH:
        raise ValueError(f"{path}: Point-BERT width {width} is not a multiple of {HEAD_WIDTH}")
    depth = len({k.split(".")[2] for k in state if k.startswith("blocks.blocks.")})
    return PointBertConfig(
        trans_dim=width,
        depth=depth,
        num_heads=width // HEAD_WIDTH,
        mlp_ratio=state["blocks.blocks.0.mlp.fc1.weight"].shape[0] / width,
        num_group=POINT_NUM_GROUP,
        group_size=POINT_GROUP_SIZE,
        encoder_dims=int(state["reduce_dim.weight"].shape[1]),
        point_dims=int(state["encoder.first_conv.0.weight"].shape[1]),
    ).to_dict()


# --- writing ----------------------------------------------------------------------------------
def check_base_config(ckpt: ReleasedCheckpoint, llm, base: Path) -> None:
    text_cfg = llm.config.get_text_config()
    fields = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
    differs = {
        f: (ckpt.config[f], getattr(text_cfg, f, None))
        for f in fields
        if f in ckpt.config and ckpt.config[f] != getattr(text_cfg, f, None)
    }
    if differs:
        raise ValueError(
            f"{base}: this base LLM does not fit {ckpt.path}/config.json (field: released vs base): {differs}"
        )


def resolve_base(ckpt: ReleasedCheckpoint, base: str | os.PathLike | None, roots: list[Path]) -> Path:
    if base is not None:
        base = Path(base)
        if not (base / "config.json").is_file():
            raise FileNotFoundError(f"--base {base}: not a transformers model directory (no config.json)")
        return base.resolve()
    name = ckpt.config.get("_name_or_path")
    if name and roots:
        try:
            path = resolve_path(name, "_name_or_path", ckpt.path / "config.json", roots)
            if (path / "config.json").is_file():
                return path
        except FileNotFoundError:
            pass
    raise ValueError(
        f"{ckpt.path}: give the base LLM directory (Vicuna-7B v1.5) with --base "
        f"(config.json names {name!r}, not found under --encoder-root)"
    )


def import_modelcompose(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    encoder_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    record: OutputRecord | None = None,
):
    """Convert the released folder `src` into the mcomp model directory `out`; returns the loaded model.
    `record` (`mcomp.output_record.OutputRecord`): the recipe and model card written with it.

    The output is verified before it appears: the model is built from the written files (encoders loaded
    strictly from their weights, projectors, LoRA adapters and modality tokens read back).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mcomp
    from mcomp.checkpoint import (
        CONFIG_NAME,
        MLLMConfig,
        base_weights_sha256,
        inside_paths,
        load_adapter_weights,
        load_modality_tokens,
    )
    from mcomp.model import MultimodalLM
    from mcomp.peft_format import load_adapter_into

    ckpt = read_released(src)
    roots = [Path(encoder_root).resolve()] if encoder_root else []
    if roots and not roots[0].is_dir():
        raise FileNotFoundError(f"--encoder-root {encoder_root}: not a directory")
    plan = plan_lora(ckpt)
    _note_folder_name(ckpt)
    base_dir = resolve_base(ckpt, base, roots)

    logger.info("loading base LLM from %s", base_dir)
    llm = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto", trust_remote_code=False)
    check_base_config(ckpt, llm, base_dir)
    base_sha = base_weights_sha256(llm)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=False)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token  # as the released training code sets it
    vocab_before = len(tokenizer)

    spec = None
    if plan.adapters:
        r = int(_field(ckpt.config, "lora_r", ckpt.path / "config.json", required=True))
        spec = LoraSpec(
            r=r,
            alpha=float(_field(ckpt.config, "lora_alpha", ckpt.path / "config.json", required=True)),
            dropout=float(ckpt.config.get("lora_dropout") or 0.0),
            target_modules=list(LLAMA_TARGETS),
        )
        check_lora(ckpt, plan, llm, r)

    out = Path(out)
    final_weights = Path(ENCODER_WEIGHTS_DIR)  # in the saved config: relative to the model directory
    with atomic_directory(out, overwrite=overwrite, inputs=[src, base, encoder_root]) as tmp:
        adapters_now, adapters_final, encoders = build_adapter_configs(
            ckpt, roots, tmp / ENCODER_WEIGHTS_DIR, final_weights
        )
        model = MultimodalLM.build(llm, tokenizer, adapters_now)
        hidden = model.hidden_size
        # projectors: strict against the built modules, named as released
        projectors = {}
        for m in ckpt.modalities:
            mc = TO_MCOMP[m]
            adapter = model.adapters[mc]
            expected = encoders[mc]["hidden_size"]
            if expected is not None and int(expected) != adapter.encoder_dim:
                raise ValueError(
                    f"{ckpt.path}/config.json: {encoders[mc]['hidden_size_field']} = {expected}, but the "
                    f"{mc} encoder ({encoders[mc]['resolved']}) gives {adapter.encoder_dim}-wide features"
                )
            want = {f"model.modal_projectors.{m}.{k}": v for k, v in adapter.projector.state_dict().items()}
            got = {f"model.modal_projectors.{m}.{k}": v for k, v in ckpt.projectors.get(m, {}).items()}
            check_state_dict(want, got, ckpt.weight_files[0], f"{m} projector ({adapter.config.projector_type})")
            projectors.update({f"{mc}.{k}": v for k, v in ckpt.projectors.get(m, {}).items()})
        save_tensors(projectors, tmp / "projectors.safetensors")
        # modality tokens
        tokens, ignored_tokens = {}, []
        for kind in ("prefix", "suffix"):
            for name, value in sorted(ckpt.tokens[kind].items()):
                if name not in ckpt.modalities:  # `default`, `default-m`: never used (spec §1.1, §3.1)
                    ignored_tokens.append(f"{kind}_tokens.{name}")
                    continue
                n = ckpt.token_count(kind, name)
                if n == 0:
                    logger.warning(
                        "%s: %s_tokens.%s is in the file but config.json sets no %s tokens; ignored (as upstream)",
                        ckpt.weight_files[0],
                        kind,
                        name,
                        kind,
                    )
                    ignored_tokens.append(f"{kind}_tokens.{name}")
                    continue
                if tuple(value.shape) != (1, n, hidden):
                    raise ValueError(
                        f"{ckpt.weight_files[0]}: {kind}_tokens.{name} has shape {tuple(value.shape)}, "
                        f"expected (1, {n}, {hidden})"
                    )
                tokens[f"{kind}.{TO_MCOMP[name]}"] = value[0]
            for m in ckpt.modalities:
                if ckpt.token_count(kind, m) and f"{kind}.{TO_MCOMP[m]}" not in tokens:
                    raise ValueError(
                        f"{ckpt.weight_files[0]}: config.json sets {ckpt.token_count(kind, m)} {kind} "
                        f"tokens for {m} but the file has no {kind}_tokens.{m}"
                    )
        if tokens:
            save_tensors(tokens, tmp / "modality_tokens.safetensors")
        # LoRA adapters
        lora_cfg = None
        if spec is not None:
            for up, name in plan.adapters.items():
                write_adapter(
                    tmp / "lora" / name,
                    {path: (ab["A"], ab["B"]) for path, ab in ckpt.lora[up].items()},
                    spec=spec,
                    base_model_name=str(base_dir),
                )
            lora_cfg = {
                "spec": spec.to_dict(),
                "adapters": list(plan.adapters.values()),
                "routes": {r: [[n, c] for n, c in t] for r, t in plan.routes.items()},
            }
        save_tokenizer(tokenizer, tmp)

        # read everything back through mcomp's own loaders
        for m in ckpt.modalities:
            load_adapter_weights(model, TO_MCOMP[m], tmp)
        if spec is not None:
            for name in plan.adapters.values():
                load_adapter_into(model, tmp / "lora" / name, name)
            model.set_routes(plan.routes)
        load_modality_tokens(model, tmp)
        if len(model.tokenizer) != vocab_before:
            raise RuntimeError("the tokenizer vocabulary changed during import")

        provenance = {
            "import": {
                "format": FORMAT,
                "source": str(ckpt.path.resolve()),
                "flavour": ckpt.flavour,
                "lora_strategy": ckpt.strategy,
                "modalities": [TO_MCOMP[m] for m in ckpt.modalities],
                "config_sha256": sha256_file(ckpt.path / "config.json"),
                "weights_sha256": {f.name: sha256_file(f) for f in ckpt.weight_files},
                "lora_adapters": plan.adapters,
                "ignored_lora_adapters": plan.ignored,
                "ignored_tensors": ignored_tokens,
                "reset_scaling_weights": ckpt.reset_weights,
                "encoders": encoders,
                "deviations": [
                    "video frames are never flipped (upstream: RandomHorizontalFlip p=0.5 at evaluation)",
                    "Point-BERT FPS start is seeded (upstream: torch.randint from the global RNG)",
                ],
            }
        }
        model.provenance = provenance
        text_cfg = llm.config.get_text_config()
        MLLMConfig(
            mcomp_version=mcomp.__version__,
            base_model=str(base_dir),
            base_model_sha256=base_sha,
            base_model_config={
                "model_type": text_cfg.model_type,
                "hidden_size": text_cfg.hidden_size,
                "num_hidden_layers": text_cfg.num_hidden_layers,
                "vocab_size": text_cfg.vocab_size,
            },
            template="vicuna_v1",
            adapters=adapters_final,
            lora=lora_cfg,
            provenance=provenance,
        ).to_json_file(tmp / CONFIG_NAME)
        if record is not None:
            record.write(
                tmp,
                {
                    "flavour": ckpt.flavour,
                    "LoRA strategy": ckpt.strategy,
                    "modalities": provenance["import"]["modalities"],
                    "LoRA adapters": plan.adapters,
                },
            )
    # the model now refers to the final files
    for m, cfg in zip(ckpt.modalities, adapters_final):
        model.adapters[TO_MCOMP[m]].config.checkpoint = inside_paths(cfg, out)["checkpoint"]
    logger.info("imported %s (%s, %s) -> %s", ckpt.path, ckpt.flavour, ", ".join(model.modalities), out)
    return model.eval()


def _note_folder_name(ckpt: ReleasedCheckpoint) -> None:
    """The folder name is never used; say so when it disagrees with the config (e.g. swapped scripts)."""
    name = ckpt.path.resolve().name.lower()
    said = "damc" if "damc" in name else "naivemc" if "naivemc" in name or "naive" in name else None
    if said and not ckpt.merged and said != ckpt.flavour:
        logger.warning(
            "%s: the folder name says %s but config.json says lora_strategy=%r (%s); following the config",
            ckpt.path,
            said,
            ckpt.strategy,
            ckpt.flavour,
        )
