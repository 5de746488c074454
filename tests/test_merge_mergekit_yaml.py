"""mergekit's merge YAML in `mcomp merge`: parameter resolution (gradients, filters), slices and passthrough,
model+lora, normalize, the two readings, errors, the recipe round trip; and, where mergekit is installed, every
mergekit example config's tensors against mergekit's own (scripts/parity_mergekit.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mcomp.cli import main
from mcomp.merge.api import TOKENIZER_FILES
from mcomp.merge.config import MCOMP, MERGEKIT, MergeConfig
from mcomp.merge.tensor_parameters import ParameterKind, evaluate_setting

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HIDDEN, VOCAB = 4, 8, 16
LAYER_SHAPES = {
    "input_layernorm.weight": (HIDDEN,),
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
    "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "post_attention_layernorm.weight": (HIDDEN,),
    "mlp.gate_proj.weight": (2 * HIDDEN, HIDDEN),
    "mlp.up_proj.weight": (2 * HIDDEN, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, 2 * HIDDEN),
}
FLOAT = ParameterKind("x", "float")


def shapes(layers: int = LAYERS) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        out.update({f"model.layers.{i}.{k}": s for k, s in LAYER_SHAPES.items()})
    out.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return out


def checkpoint(directory: Path, seed: int, base: dict | None = None, dtype=torch.float16) -> dict:
    """A tiny Llama-named checkpoint: `base` plus seeded noise (or seeded values), with a config.json."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        k: ((base[k].float() if base else 0) + 0.05 * torch.randn(s, generator=g)).to(dtype)
        for k, s in shapes().items()
    }
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": LAYERS}
    (directory / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.fixture
def models(tmp_path):
    base = checkpoint(tmp_path / "base", 0)
    return {"base": base, **{name: checkpoint(tmp_path / name, i + 1, base) for i, name in enumerate("abc")}}


def config_of(tmp_path: Path, method: str, models: list[tuple[str, dict]], dtype: str = "float32", **params) -> dict:
    """A config merging `models` (name under tmp_path, its parameters) onto tmp_path/base."""
    return {
        "merge_method": method,
        "base_model": str(tmp_path / "base"),
        "models": [{"model": m if "/" in m else str(tmp_path / m), "parameters": p} for m, p in models],
        **({"parameters": params} if params else {}),
        "dtype": dtype,
    }


def merge(tmp_path: Path, config: dict, name: str = "out") -> dict[str, torch.Tensor]:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", str(path), "--out", str(tmp_path / name), "--no-progress"]) == 0
    return load_file(str(tmp_path / name / "model.safetensors"))


# -- parameter resolution -----------------------------------------------------------------------
@pytest.mark.parametrize("values", [[0, 0.3, 0.7, 1], [1, 0.7, 0.1], [0.5, 2.0]])
def test_a_gradient_interpolates_over_the_layers_as_mergekit_does(values):
    layers = 40
    for i in range(layers):
        t = i / (layers - 1)
        expected = np.interp(t, np.linspace(0, 1, len(values)), values)  # evenly spaced knots, linear between
        assert evaluate_setting(values, "x", t, FLOAT, "w") == pytest.approx(expected, abs=1e-12)


def test_a_gradient_of_flags_picks_entries():
    kind = ParameterKind("normalize", "bool", False)
    assert [evaluate_setting([True, False], "x", t, kind, "w") for t in (0, 0.49, 0.99, 1)] == [True, True, True, False]


def test_filters_pick_the_first_match_and_fall_back():
    setting = [{"filter": "mlp", "value": 0.5}, {"filter": "self_attn", "value": [0, 1]}, {"value": 0.1}]
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.0, FLOAT, "w") == 0.5
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.25, FLOAT, "w") == 0.25
    assert evaluate_setting(setting, "model.norm.weight", 1.0, FLOAT, "w") == 0.1
    assert evaluate_setting(setting[:1], "model.norm.weight", 1.0, FLOAT, "w") is None  # the next scope decides


def test_gradients_and_filters_reach_every_tensor(tmp_path, models):
    """task_arithmetic with a weight gradient on attention and a filter fallback: each tensor gets its own λ_i."""
    gradient = [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]
    out = merge(tmp_path, config_of(tmp_path, "task_arithmetic", [("a", {"weight": gradient}), ("b", {"weight": 1.0})]))
    for name, value in out.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        w = layer / (LAYERS - 1) if layer is not None and "self_attn" in name else 0.5
        base = models["base"][name].float()
        expected = base + w * (models["a"][name].float() - base) + (models["b"][name].float() - base)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


# -- methods under mergekit's reading -------------------------------------------------------------
def test_normalize_divides_by_the_weights(tmp_path, models):
    models_in = [("a", {"weight": 1.0}), ("b", {"weight": 3.0})]
    out = merge(tmp_path, config_of(tmp_path, "task_arithmetic", models_in, normalize=True))
    for name, value in out.items():
        base = models["base"][name].float()
        expected = base + ((models["a"][name].float() - base) + 3 * (models["b"][name].float() - base)) / 4
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_ties_keeps_each_models_own_density_per_tensor(tmp_path, models):
    """mergekit's TIES: per tensor, model i keeps its int(density_i·N) largest |τ|; one model: no sign conflict."""
    out = merge(tmp_path, config_of(tmp_path, "ties", [("a", {"weight": 1.0, "density": 0.25})], normalize=False))
    for name, value in out.items():
        tau = models["a"][name].float() - models["base"][name].float()
        kept = (value - models["base"][name].float()) != 0
        assert int(kept.sum()) == max(1, int(0.25 * tau.numel()))
        assert float(tau.abs()[kept].min()) >= float(tau.abs()[~kept].max())


def test_slices_renumber_the_layers_and_passthrough_copies_them(tmp_path, models):
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(tmp_path / "a"), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(tmp_path / "b"), "layer_range": [1, 4]}]},
        ],
    }
    out = merge(tmp_path, config)
    wanted = {
        f"model.layers.{k}.{t}": ("a" if k < 2 else "b", k if k < 2 else k - 1) for k in range(5) for t in LAYER_SHAPES
    }
    assert set(out) == set(wanted) | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for name, (model, layer) in wanted.items():
        source = f"model.layers.{layer}." + name.split(".", 3)[3]
        assert torch.equal(out[name], models[model][source])
    assert torch.equal(out["model.embed_tokens.weight"], models["a"]["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], models["b"]["lm_head.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5


def test_model_plus_lora_merges_the_lora_applied_model(tmp_path, models):
    """'model+lora' equals merging the model with the LoRA folded in (W + s·B·A in float32, one rounding)."""
    r, alpha = 2, 4.0
    g = torch.Generator().manual_seed(7)
    adapter = tmp_path / "lora"
    adapter.mkdir()
    factors, applied = {}, dict(models["a"])
    for i in range(LAYERS):
        key = f"model.layers.{i}.self_attn.q_proj"
        a, b = torch.randn(r, HIDDEN, generator=g), torch.randn(HIDDEN, r, generator=g)
        factors[f"base_model.model.{key}.lora_A.weight"] = a
        factors[f"base_model.model.{key}.lora_B.weight"] = b
        applied[f"{key}.weight"] = (applied[f"{key}.weight"].float() + (b @ a) * (alpha / r)).half()
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    lora_config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(lora_config))
    (tmp_path / "applied").mkdir()
    save_file(applied, str(tmp_path / "applied" / "model.safetensors"))
    (tmp_path / "applied" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())

    def config(first: str) -> dict:
        models_in = [(first, {"weight": 1.0, "density": 0.5}), ("b", {"weight": 0.5, "density": 0.7})]
        return config_of(tmp_path, "ties", models_in, dtype="float16")

    with_lora = merge(tmp_path, config(f"{tmp_path / 'a'}+{adapter}"), "with_lora")
    folded = merge(tmp_path, config(str(tmp_path / "applied")), "folded")
    assert with_lora.keys() == folded.keys()
    assert all(torch.equal(with_lora[k], folded[k]) for k in folded)
    assert not torch.equal(
        with_lora["model.layers.0.self_attn.q_proj.weight"],
        merge(tmp_path, config(str(tmp_path / "a")), "plain")["model.layers.0.self_attn.q_proj.weight"],
    )


# -- readings, errors, round trip -------------------------------------------------------------------
def test_tokenizer_source_gives_every_tokenizer_file_from_the_donor(tmp_path, models):
    """The output's tokenizer is the donor's whole (no file of the base's left beside it)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    for name, template in (("base", "{{ 'base' }}"), ("a", "{{ 'donor' }}"), ("b", "{{ 'b' }}")):
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")))
        fast.chat_template = template
        fast.save_pretrained(tmp_path / name)
    (tmp_path / "base" / "merges.txt").write_text("#version: 0.2\n")  # a file the donor has not
    config = config_of(tmp_path, "task_arithmetic", [("a", {"weight": 1.0}), ("b", {"weight": 1.0})])
    merge(tmp_path, {**config, "tokenizer_source": str(tmp_path / "a")})
    out, donor = tmp_path / "out", tmp_path / "a"
    for name in TOKENIZER_FILES:
        assert (out / name).is_file() == (donor / name).is_file(), name
        if (donor / name).is_file():
            assert (out / name).read_bytes() == (donor / name).read_bytes(), name


def test_the_parameter_names_choose_the_reading(tmp_path):
    def cfg(method, params, model_params=None):
        data = {
            "merge_method": method,
            "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 1.0, **(model_params or {})}}],
            "parameters": params,
        }
        return MergeConfig.from_mapping(data, "x.yml")

    assert cfg("ties", {"density": 0.2}).reading() == MERGEKIT
    assert cfg("ties", {"normalize": True}, {"density": 0.5}).reading() == MERGEKIT
    assert cfg("ties", {"density": 0.2, "scope": "global"}).reading() == MCOMP
    assert cfg("dare_ties", {"rescale": "inverse"}).reading() == MCOMP
    assert cfg("dare_ties", {"rescale": True}).reading() == MERGEKIT
    assert cfg("pcb", {"ratio": 0.1}).reading() == MCOMP
    with_rank = MergeConfig.from_mapping({**cfg("ties", {"density": 0.2}).to_dict(), "lora_rank": 8}, "x.yml")
    assert with_rank.reading() == MCOMP  # mcomp's own key: mergekit's reading would drop it
    with pytest.raises(ValueError, match=r"x.yml: models\[0\].parameters: per-model parameter\(s\) \['density'\]"):
        cfg("ties", {"scope": "global"}, {"density": 0.5})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge_methd": "ties"}, r"bad.yml: unknown field\(s\) \['merge_methd'\]"),
        ({"modules": {}}, r"bad.yml: 'modules': per-module merges"),
        ({"tokenizer_source": "union"}, r"bad.yml: tokenizer_source 'union' is not supported"),
        ({"parameters": {"normalize": []}}, r"bad.yml: parameters.normalize: an empty list"),
        ({"parameters": {"int8_mask": [1, {"value": 2}]}}, r"bad.yml: parameters.int8_mask: a list must hold only"),
        ({"dtype": "float8"}, r"bad.yml: dtype must be one of"),
    ],
)
def test_malformed_configs_name_the_field_and_the_file(change, message):
    data = {"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}], **change}
    with pytest.raises(ValueError, match=message):
        MergeConfig.from_mapping(data, "bad.yml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"parameters": {"densty": 0.5}},
            r"parameters: merge method 'ties' \(mergekit's reading\) has no parameter\(s\) \['densty'\]",
        ),
        (
            {"parameters": {"normalize": [{"filter": "attn_nothing", "value": True}]}},
            r"filter 'attn_nothing' matches no tensor",
        ),
        (
            {"models": [{"model": "a", "parameters": {"density": 0.5}}]},
            r"missing required parameter 'weight' for model",
        ),
        ({"parameters": {"normalize": 0.5}}, r"parameters.normalize: parameter 'normalize' must be true or false"),
    ],
)
def test_plan_errors_name_what_is_wrong(tmp_path, models, change, message):
    data = {
        "merge_method": "ties",
        "base_model": str(tmp_path / "base"),
        "models": [{"model": "a", "parameters": {"weight": 1.0}}],
    }
    data.update(change)
    for entry in data["models"]:
        entry["model"] = str(tmp_path / entry["model"])
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(data))
    from mcomp.merge.plan_merge import merge_config

    with pytest.raises(ValueError, match=message):
        merge_config(MergeConfig.from_yaml(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_layer_range_out_of_bounds_is_refused(tmp_path, models):
    data = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(tmp_path / "a"), "layer_range": [2, 9]}]}],
    }
    from mcomp.merge.plan_merge import merge_config

    with pytest.raises(
        ValueError, match=r"slices\[0\]: layer_range \[2, 9\] of .* is out of bounds \(it has 4 layers\)"
    ):
        merge_config(MergeConfig.from_mapping(data, "s.yml"), tmp_path / "out")


def test_the_normalised_config_merges_the_same_bytes(tmp_path, models):
    density = [{"filter": "mlp", "value": 0.4}, {"value": 0.8}]
    models_in = [("a", {"weight": [1, 0.3], "density": density}), ("b", {"weight": 0.7, "density": 0.5})]
    data = config_of(tmp_path, "ties", models_in, dtype="float16", int8_mask=True)
    first = MergeConfig.from_mapping(data, "first.yml")
    again = MergeConfig.from_mapping(yaml.safe_load(yaml.safe_dump(first.to_dict())), "again.yml")
    assert again.to_dict() == first.to_dict()
    merge(tmp_path, data, "one")
    merge(tmp_path, again.to_dict(), "two")
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "two" / "model.safetensors"
    ).read_bytes()


# -- parity with mergekit itself ----------------------------------------------------------------------
def test_every_mergekit_example_equals_mergekits_output(tmp_path):
    pytest.importorskip("mergekit")
    spec = importlib.util.spec_from_file_location("parity_mergekit", ROOT / "scripts" / "parity_mergekit.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    rows = [
        parity.run_config(label, config, tmp_path / f"{i:02d}", parity.default_mergekit_path())
        for i, (label, config) in enumerate(parity.all_configs())
    ]
    assert {r["config"] for r in rows} >= {f"{name}.yml" for name in parity.EXAMPLES}
    compared = [r for r in rows if not r.get("note")]
    assert len(compared) >= len(parity.EXAMPLES) - 1
    assert [(r["config"], r["problems"]) for r in compared if r["problems"]] == []
