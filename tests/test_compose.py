"""NaiveMC and DAMC composition: every method and backend, exactness, bad input, CLI."""

from __future__ import annotations

import json

import pytest
import torch

import mcomp
from mcomp.cli import main
from mcomp.compose import compose
from mcomp.lora import fold_route, routed_layers
from mcomp.merge import available_methods
from tests.composition_fixtures import train_models

# every registered backend that composes (SLERP takes exactly one model)
BACKENDS = sorted(n for n, cls in available_methods().items() if cls.model_count is None)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return train_models(tmp_path_factory.mktemp("zoo"))


def media(zoo, image=True, audio=True):
    out = {}
    if image:
        out["image"] = str(zoo["image_data"].parent / "img0.png")
    if audio:
        out["audio"] = str(zoo["audio_data"].parent / "aud2.wav")
    return out


def prompt(model, image=True, audio=True):
    lines = (["image: <image>"] if image else []) + (["audio: <audio>"] if audio else [])
    return model.template.prompt("\n".join(lines + ["What do they have in common?"]))


def logits(model, image=True, audio=True):
    with torch.no_grad():
        inputs = model.prepare_inputs([prompt(model, image, audio)], [media(model_zoo[0], image, audio)])
        return model(inputs).logits


model_zoo = []


@pytest.fixture(autouse=True)
def _zoo_for_helpers(zoo):
    model_zoo[:] = [zoo]


def test_naivemc_linear_is_exact_without_materialising(zoo):
    model = compose(
        {"image": zoo["image-plain"], "audio": zoo["audio-plain"]},
        method="naivemc",
        weights={"image": 0.7, "audio": 0.4},
    )
    assert model.modalities == ["image", "audio"]
    assert model.routing.routes == {"text": [("text-image", 0.7), ("text-audio", 0.4)]}
    unmaterialised = logits(model)
    fold_route(model.llm, model.routing.routes["text"])  # the same merge folded into dense weights
    for layer in routed_layers(model.llm).values():
        for name in list(layer.lora_A):
            layer.remove_adapter(name)
    torch.testing.assert_close(logits(model), unmaterialised, atol=1e-5, rtol=1e-5)


def test_damc_with_one_modality_reproduces_that_model(zoo):
    single = mcomp.load(zoo["image-damc"])
    expected = logits(single, audio=False)
    model = compose(
        {"image": zoo["image-damc"], "audio": zoo["audio-damc"]}, method="damc", weights={"image": 1.0, "audio": 0.0}
    )
    assert model.routing.routes["image"] == [("image", 1.0)] and model.routing.routes["audio"] == [("audio", 1.0)]
    torch.testing.assert_close(logits(model, audio=False), expected, atol=1e-5, rtol=1e-5)
    # and with the audio model's text weight on, the text tokens change but the image tokens' adapter does not
    mixed = compose({"image": zoo["image-damc"], "audio": zoo["audio-damc"]}, method="damc")
    assert not torch.allclose(logits(mixed, audio=False), expected, atol=1e-4)


@pytest.mark.parametrize("method", ["naivemc", "damc"])
@pytest.mark.parametrize("merge", BACKENDS)
def test_every_method_and_backend_composes_saves_and_loads(zoo, tmp_path, method, merge):
    suffix = "damc" if method == "damc" else "plain"
    params = {
        "pcb": {"ratio": 0.5, "clip": 0.01},
        "ties": {"density": 0.5},
        "dare_ties": {"density": 0.7, "seed": 1},
        "dare_linear": {"density": 0.7, "seed": 1},
        "breadcrumbs": {"density": 0.5, "gamma": 0.05},
        "breadcrumbs_ties": {"density": 0.5, "gamma": 0.05},
        "della": {"density": 0.5, "epsilon": 0.1, "seed": 1},
        "della_linear": {"density": 0.5, "epsilon": 0.1, "seed": 1},
    }.get(merge, {})
    model = compose(
        {"image": zoo[f"image-{suffix}"], "audio": zoo[f"audio-{suffix}"]},
        method=method,
        merge=merge,
        merge_params=params,
    )
    comp = model.provenance["composition"]
    assert comp["method"] == method and comp["merge"] == merge and len(comp["inputs"]) == 2
    before = logits(model)
    assert torch.isfinite(before).all()
    model.save_pretrained(tmp_path / "composed")
    loaded = mcomp.load(tmp_path / "composed")
    assert loaded.provenance == model.provenance
    torch.testing.assert_close(logits(loaded), before, atol=1e-5, rtol=1e-5)
    # any subset of the modalities works
    assert loaded.generate([prompt(loaded, audio=False)], [media(zoo, audio=False)], max_new_tokens=3)
    if method == "damc":
        assert loaded.prefix_tokens["audio"].shape[0] == 5


@pytest.mark.parametrize("method", ["damc"])  # NaiveMC's text merge is the same function
def test_knots_composes_from_the_text_adapters_factors(zoo, method):
    """compose hands KnOTS the text adapters as LoRA factors. Aligned and summed (task arithmetic as the base
    method) they are the plain weighted sum of the dense s·B·A, which compose merges for task arithmetic."""
    suffix = "damc" if method == "damc" else "plain"
    pair = {"image": zoo[f"image-{suffix}"], "audio": zoo[f"audio-{suffix}"]}
    weights = {"image": 0.7, "audio": 0.4}
    summed = compose(pair, method=method, merge="task_arithmetic", weights=weights)
    aligned = compose(
        pair, method=method, merge="knots", merge_params={"base_method": "task_arithmetic"}, weights=weights
    )
    torch.testing.assert_close(logits(aligned), logits(summed), atol=1e-4, rtol=1e-4)
    ties = compose(pair, method=method, merge="knots", merge_params={"base_params": {"density": 0.5}}, weights=weights)
    assert (logits(ties) - logits(summed)).abs().max() > 1e-3  # TIES in the aligned basis is another merge


def test_damc_from_plain_models_needs_convert(zoo):
    pair = {"image": zoo["image-plain"], "audio": zoo["audio-plain"]}
    with pytest.raises(ValueError, match="DAMC needs a model trained with --decoupled"):
        compose(pair, method="damc")
    model = compose(pair, method="damc", convert=True)
    layer = next(iter(routed_layers(model.llm).values()))
    assert torch.equal(layer.lora_B["image"], layer.lora_B["text-image"])  # the one LoRA serves both


def test_a_modality_the_weights_do_not_name_keeps_lambda_one(zoo):
    """Published rule (online-merge-reset-default-m=λ): an unlisted default-m keeps scaling 2.0, i.e. λ = 1."""
    pair = {"image": zoo["image-plain"], "audio": zoo["audio-plain"]}
    partial = compose(pair, weights={"image": 0.5})
    assert partial.provenance["composition"]["weights"] == {"image": 0.5, "audio": 1.0}
    explicit = compose(pair, weights={"image": 0.5, "audio": 1.0})
    assert torch.equal(logits(partial), logits(explicit))
    assert not torch.allclose(logits(partial), logits(compose(pair, weights={"image": 0.5, "audio": 0.0})))


def test_bad_inputs_are_refused_clearly(zoo, tmp_path, tokenizer):
    with pytest.raises(ValueError, match="holds a 'image' model, not 'audio'"):
        compose({"image": zoo["image-plain"], "audio": zoo["image-damc"]})
    with pytest.raises(ValueError, match="modality 'image' given twice"):
        compose({"image": zoo["image-plain"], "vision": zoo["image-damc"]})
    with pytest.raises(FileNotFoundError, match="model directory for 'audio' not found"):
        compose({"image": zoo["image-plain"], "audio": tmp_path / "nope"})
    with pytest.raises(ValueError, match="weights given for \\['point'\\]"):
        compose({"image": zoo["image-plain"], "audio": zoo["audio-plain"]}, weights={"point": 1.0})
    # a model trained on another base
    other = mcomp.load(zoo["audio-plain"])
    with torch.no_grad():
        other.llm.model.norm.weight.add_(0.5)
    other.llm.name_or_path = ""
    other.save_pretrained(tmp_path / "other-base")
    with pytest.raises(ValueError, match="different base weights"):
        compose({"image": zoo["image-plain"], "audio": tmp_path / "other-base"})


def test_cli_compose(zoo, tmp_path, capsys):
    out = tmp_path / "composed"
    code = main(
        [
            "compose",
            "--modalities",
            "image,audio",
            "--method",
            "damc",
            "--merge",
            "ties",
            "--models",
            f"image={zoo['image-damc']},audio={zoo['audio-damc']}",
            "--weights",
            "image=0.6",
            "--merge-params",
            "density=0.5",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    # audio, not named by --weights, keeps λ = 1 (published online-merge-reset-default-m=λ), and says so
    assert (
        "composed image, audio with damc + ties (coefficients as resolved: image=0.6, audio=1)"
        in capsys.readouterr().out
    )
    cfg = json.loads((out / "mcomp_config.json").read_text())
    assert cfg["provenance"]["composition"]["weights"] == {"image": 0.6, "audio": 1.0}
    assert mcomp.load(out).modalities == ["image", "audio"]
    assert (
        main(
            [
                "compose",
                "--models",
                f"image={zoo['image-damc']}",
                "--modalities",
                "image,audio",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 1
    )
    assert "differ" in capsys.readouterr().err


@pytest.mark.parametrize("merge", ["linear", "pcb"])
def test_weight_search_is_seeded_and_its_score_is_real(zoo, merge):
    from mcomp.compose import dev_objective, search_weights
    from mcomp.data import load_conversation_data

    dev = load_conversation_data(zoo["image_data"])[:2] + load_conversation_data(zoo["audio_data"])[:2]
    pair = {"image": zoo["image-damc"], "audio": zoo["audio-damc"]}
    params = {"ratio": 0.5, "clip": 0.01} if merge == "pcb" else {}
    weights, score = search_weights(pair, dev, method="damc", merge=merge, merge_params=params, budget=6, seed=3)
    again, score_again = search_weights(pair, dev, method="damc", merge=merge, merge_params=params, budget=6, seed=3)
    assert weights == again and score == score_again
    assert set(weights) == {"image", "audio"} and all(0.0 <= w <= 1.5 for w in weights.values())
    if merge == "linear":  # the reported score is the dev objective of the composition with those weights
        model = compose(pair, method="damc", weights=weights)
        assert dev_objective(dev)(model) == pytest.approx(score, rel=1e-5)


def published_ties_factors(checks: list[dict[str, torch.Tensor]], k: int = 20) -> dict[str, torch.Tensor]:
    """The released merge script's `ties-mean` (ties_merging.do_merging): the shared tensors of every
    checkpoint flattened in sorted-key order, the top k% magnitudes kept per checkpoint (kthvalue of
    d - int(d k/100)), signs elected by the sum, zero signs set to the majority, disjoint mean, λ 1."""
    keys = sorted(checks[0])
    flat = torch.vstack([torch.cat([c[key].reshape(-1) for key in keys]) for c in checks])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * k / 100), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    merged = selected.sum(0) / torch.clamp((selected != 0).sum(0).float(), min=1)
    out, start = {}, 0
    for key in keys:
        n = checks[0][key].numel()
        out[key] = merged[start : start + n].view_as(checks[0][key])
        start += n
    return out


def text_factors(model, adapter: str) -> dict[str, torch.Tensor]:
    return {
        f"{path}.{kind}": getattr(layer, kind)[adapter].detach().float()
        for path, layer in routed_layers(model.llm).items()
        for kind in ("lora_A", "lora_B")
    }


@pytest.mark.parametrize("method", ["naivemc", "damc"])
def test_factor_space_merges_are_the_released_scripts(zoo, method):
    """merge_space='factors' restores the released merge script's strategies, which merge LoRA A and B
    apart: `ties-mean` (K 20) and `mean` ((ΣB/n)(ΣA/n), cross terms included)."""
    flavour = "damc" if method == "damc" else "plain"
    pair = {"image": zoo[f"image-{flavour}"], "audio": zoo[f"audio-{flavour}"]}
    checks = [text_factors(mcomp.load(path), "text") for path in pair.values()]
    ties = compose(pair, method=method, merge="ties", merge_space="factors")
    for key, value in published_ties_factors(checks).items():
        torch.testing.assert_close(text_factors(ties, "text-merged")[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert ties.provenance["composition"]["merge_space"] == "factors"
    mean = compose(pair, method=method, merge="linear", merge_space="factors")
    for key in checks[0]:
        torch.testing.assert_close(text_factors(mean, "text-merged")[key], (checks[0][key] + checks[1][key]) / 2)
    # not the ΔW-space merge: the product of the mean factors has cross terms
    delta = compose(pair, method=method, merge="linear")
    assert not torch.allclose(logits(mean), logits(delta), atol=1e-4)
    with pytest.raises(ValueError, match="merge_space must be one of"):
        compose(pair, merge_space="lora")
