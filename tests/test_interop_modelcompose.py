"""`mcomp import modelcompose`: tiny released-format checkpoints (all modalities, NaiveMC and DAMC) are
imported, composed and run; the forward and greedy generation equal an independent plain-torch
re-computation of the released formulas (spec modelcompose.md §3.4-3.5, §4)."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mcomp
import mcomp.interop  # noqa: F401  (registers the LanguageBind video adapter)
from mcomp import cli
from mcomp.compose import compose
from mcomp.interop.modelcompose import import_modelcompose
from mcomp.io import load_tensors
from mcomp.peft_format import read_adapter
from tests.interop_fixtures import (
    ALPHA,
    LAYERS,
    R,
    merge_released,
    released_state,
    write_base,
    write_encoders,
    write_released,
)

UP = {"image": "vision", "audio": "audio", "video": "video", "point": "point"}
TAG = {"vision": "<image>", "audio": "<audio>", "video": "<video>", "point": "<point>"}
MODALITIES = ["vision", "audio", "video", "point"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("interop")
    base = write_base(root)
    enc = write_encoders(root)
    vocab = len(AutoTokenizer.from_pretrained(base))
    released, imported = {}, {}
    for i, m in enumerate(MODALITIES):
        for flavour in ("damc", "naivemc"):
            src = write_released(root / "released", m, flavour, vocab, seed=100 + 10 * i + (flavour == "damc"))
            released[m, flavour] = src
            imported[m, flavour] = root / "mcomp" / f"{m}-{flavour}"
            import_modelcompose(src, imported[m, flavour], base=base, encoder_root=enc)
    return {"root": root, "base": base, "enc": enc, "vocab": vocab, "released": released, "imported": imported}


def media_for(upstream: str, image_files):
    from PIL import Image

    if upstream == "vision":
        return str(image_files["png"])
    if upstream == "video":
        return Image.open(image_files["jpg"]).convert("RGB")  # a still image: one frame repeated
    if upstream == "audio":
        t = torch.arange(16000) / 16000
        return (0.3 * torch.sin(2 * torch.pi * 440 * t), 16000)
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(size=(8192, 3)), rng.uniform(size=(8192, 3))], axis=1)


# --- the released semantics, recomputed independently ------------------------------------------
class RefLinear(torch.nn.Module):
    """W x + per-token LoRA terms: text -> sum_m lam_m (alpha/r) B_m A_m x, modality m -> its own terms."""

    def __init__(self, base: torch.nn.Linear, terms: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]], state):
        super().__init__()
        self.base, self.terms, self.state = base, terms, state

    def forward(self, x):
        y = self.base(x)
        labels = self.state["labels"]
        for group, terms in self.terms.items():
            idx = [i for i, lab in enumerate(labels) if lab == group]
            if not idx:
                continue
            xs = x[:, idx]
            delta = sum(c * (xs @ a.t() @ b.t()) for a, b, c in terms)
            y[:, idx] = y[:, idx] + delta
        return y


def spec_tokenize(tokenizer, prompt: str) -> list:
    """Spec §4: split at placeholders, tokenise each chunk alone, BOS once, tags kept as markers."""
    ids = [tokenizer.bos_token_id]
    for part in re.split(r"(<image>|<audio>|<video>|<point>)", prompt):
        if part in TAG.values():
            ids.append(part)
        elif part:
            chunk = tokenizer(part)["input_ids"]
            ids += chunk[1:] if chunk[0] == tokenizer.bos_token_id else chunk
    return ids


def build_reference(base_dir, states: dict[str, dict], lam: dict[str, float], masked: bool):
    """A fresh base Llama with every targeted linear replaced by RefLinear (released formula)."""
    from transformers import LlamaForCausalLM

    llm = LlamaForCausalLM.from_pretrained(base_dir).eval()
    state = {"labels": []}
    s = ALPHA / R
    for layer in range(LAYERS):
        blk = llm.model.layers[layer]
        for parent, names in (
            (blk.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (blk.mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                path = f"model.layers.{layer}.{'self_attn' if parent is blk.self_attn else 'mlp'}.{name}"

                def ab(sd, adapter, path=path):
                    return (
                        sd[f"{path}.lora_A.{adapter}.weight"].float(),
                        sd[f"{path}.lora_B.{adapter}.weight"].float(),
                    )

                text = [(*ab(sd, "default"), lam[m] * s) for m, sd in states.items()]
                terms = {"text": text}
                for m, sd in states.items():
                    terms[m] = [(*ab(sd, m), s)] if masked else text
                setattr(parent, name, RefLinear(getattr(parent, name), terms, state))
    return llm, state


def reference_inputs(llm, tokenizer, prompt, states, feats, tokens: bool):
    emb = llm.get_input_embeddings().weight
    pieces, labels = [], []
    for item in spec_tokenize(tokenizer, prompt):
        if isinstance(item, int):
            pieces.append(emb[item][None])
            labels.append("text")
            continue
        m = next(k for k, v in TAG.items() if v == item)
        sd = states[m]

        def p(k, sd=sd, m=m):
            return sd[f"model.modal_projectors.{m}.{k}"].float()

        h = F.linear(F.gelu(F.linear(feats[m], p("0.weight"), p("0.bias"))), p("2.weight"), p("2.bias"))
        if tokens:
            h = torch.cat([sd[f"prefix_tokens.{m}"][0].float(), h, sd[f"suffix_tokens.{m}"][0].float()])
        pieces.append(h)
        labels += [m] * h.shape[0]
    return torch.cat(pieces)[None], labels


def encoder_features(model, upstream, source):
    adapter = model.adapters[{v: k for k, v in UP.items()}[upstream]]
    with torch.no_grad():
        return adapter.encode(adapter.prepare([source]))[0].float()


def check_against_reference(world, model, pair, flavour, lam, image_files, new_tokens=4):
    states = {
        m: released_state(m, flavour == "damc", seed=100 + 10 * MODALITIES.index(m) + (flavour == "damc")) for m in pair
    }
    prompt = model.template.prompt("\n".join(f"{m}: {TAG[m]}" for m in pair) + "\nWhat do they share?")
    media = {m: media_for(m, image_files) for m in pair}
    with torch.no_grad():
        got = model(model.prepare_inputs([prompt], [media])).logits
        ref_llm, state = build_reference(world["base"], states, lam, masked=flavour == "damc")
        feats = {m: encoder_features(model, m, media[m]) for m in pair}
        embeds, labels = reference_inputs(ref_llm, model.tokenizer, prompt, states, feats, tokens=flavour == "damc")
        state["labels"] = labels
        want = ref_llm(inputs_embeds=embeds).logits
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        # greedy decoding: new tokens are text (the decode steps use the text adapters)
        ids = []
        for _ in range(new_tokens):
            nxt = int(ref_llm(inputs_embeds=embeds).logits[0, -1].argmax())
            if nxt == model.tokenizer.eos_token_id:
                break
            ids.append(nxt)
            embeds = torch.cat([embeds, ref_llm.get_input_embeddings().weight[nxt][None, None]], dim=1)
            state["labels"] = state["labels"] + ["text"]
    text = model.generate([prompt], [media], max_new_tokens=new_tokens)[0]
    assert text == model.tokenizer.decode(ids, skip_special_tokens=True).strip()


# --- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("flavour", ["damc", "naivemc"])
def test_import_maps_every_released_tensor(world, modality, flavour):
    out = world["imported"][modality, flavour]
    cfg = json.loads((out / "mcomp_config.json").read_text())
    released = torch.load(world["released"][modality, flavour] / "adapter_model.bin", weights_only=True)
    mc = {v: k for k, v in UP.items()}[modality]
    (adapter,) = cfg["adapters"]
    assert (
        adapter["adapter"]
        == {"vision": "image", "audio": "audio", "video": "video_languagebind", "point": "point"}[modality]
    )
    assert cfg["base_model"] == str(world["base"].resolve())
    # LoRA: default -> text, the modality adapter -> the mcomp modality; peft format, exact values
    names = ["text", mc] if flavour == "damc" else ["text"]
    assert cfg["lora"]["adapters"] == names
    assert cfg["lora"]["spec"]["r"] == R and cfg["lora"]["spec"]["alpha"] == ALPHA
    routes = {"text": [["text", 1.0]], **({mc: [[mc, 1.0]]} if flavour == "damc" else {})}
    assert cfg["lora"]["routes"] == routes
    for name, upstream in zip(names, ["default", modality]):
        spec, pairs = read_adapter(out / "lora" / name)
        assert (spec.r, spec.alpha) == (R, ALPHA) and len(pairs) == LAYERS * 7
        for path, (a, b) in pairs.items():
            assert torch.equal(a, released[f"{path}.lora_A.{upstream}.weight"])
            assert torch.equal(b, released[f"{path}.lora_B.{upstream}.weight"])
    # projectors keep their parameter names under the mcomp modality
    proj = load_tensors(out / "projectors.safetensors")
    prefix = f"model.modal_projectors.{modality}."
    assert proj.keys() == {f"{mc}.{k[len(prefix) :]}" for k in released if k.startswith(prefix)}
    for k, v in proj.items():
        assert torch.equal(v, released[prefix + k.split(".", 1)[1]])
    # DAMC tokens [1, 5, H] -> [5, H]; the unused `default` tokens are dropped
    tokens_file = out / "modality_tokens.safetensors"
    if flavour == "damc":
        tokens = load_tensors(tokens_file)
        assert set(tokens) == {f"prefix.{mc}", f"suffix.{mc}"}
        assert torch.equal(tokens[f"prefix.{mc}"], released[f"prefix_tokens.{modality}"][0])
    else:
        assert not tokens_file.exists()
    # encoder options as released
    model = mcomp.load(out)
    if modality == "vision":
        assert (adapter["select_layer"], adapter["select_feature"], adapter["image_aspect_ratio"]) == (
            -2,
            "patch",
            "pad",
        )
        assert model.adapters["image"].num_tokens == 16  # 4x4 patches, CLS dropped
    elif modality == "video":
        assert adapter["select_layer"] == -2 and adapter["num_frames"] == 8
        assert model.adapters["video"].num_tokens == 8 * 17  # every frame keeps CLS + patches
    elif modality == "point":
        assert adapter["normalization"] == "none" and adapter["num_points"] == 8192
        assert model.inserted_tokens("point") == 513 + (10 if flavour == "damc" else 0)
    else:
        assert adapter["projector_type"] == "qformer_32N_2L" and model.adapters["audio"].num_tokens == 32
    assert model.provenance["import"]["flavour"] == flavour
    assert len(model.tokenizer) == world["vocab"]  # placeholders never enter the vocabulary


def test_compose_damc_matches_released_formula(world, image_files):
    model = compose(
        {"image": world["imported"]["vision", "damc"], "point": world["imported"]["point", "damc"]},
        method="damc",
        weights={"image": 0.6, "point": 0.4},
    )
    check_against_reference(world, model, ["vision", "point"], "damc", {"vision": 0.6, "point": 0.4}, image_files)


def test_compose_naivemc_matches_released_formula(world, image_files):
    model = compose(
        {"image": world["imported"]["vision", "naivemc"], "video": world["imported"]["video", "naivemc"]},
        method="naivemc",
        weights={"image": 0.7, "video": 0.5},
    )
    check_against_reference(world, model, ["vision", "video"], "naivemc", {"vision": 0.7, "video": 0.5}, image_files)


def test_single_imported_damc_model_matches_released_formula(world, image_files):
    model = mcomp.load(world["imported"]["video", "damc"])
    check_against_reference(world, model, ["video"], "damc", {"video": 1.0}, image_files, new_tokens=2)


def test_released_merged_folder_equals_compose_of_imports(world, tmp_path, image_files):
    merged = merge_released(
        [world["released"]["video", "damc"], world["released"]["vision", "damc"]],
        tmp_path / "multimodal-vicuna-7b-v1.5-video-vision-merge",
        "default-video=0.6,default-vision=0.4",
    )
    model = import_modelcompose(merged, tmp_path / "merged", base=world["base"], encoder_root=world["enc"])
    assert model.modalities == ["image", "video"]  # upstream order: vision before video
    assert model.routing.routes == {
        "text": [("text-image", 0.4), ("text-video", 0.6)],
        "image": [("image", 1.0)],
        "video": [("video", 1.0)],
    }
    check_against_reference(
        world, model, ["vision", "video"], "damc", {"vision": 0.4, "video": 0.6}, image_files, new_tokens=2
    )


def test_flavour_comes_from_config_not_folder_name(world, tmp_path, caplog):
    # the released point scripts are swapped: a "-damc" folder may hold a `same` (NaiveMC) model
    src = write_released(tmp_path, "point", "naivemc", world["vocab"], seed=7, folder_flavour="damc")
    with caplog.at_level(logging.WARNING, logger="mcomp.interop.modelcompose"):
        model = import_modelcompose(src, tmp_path / "out", base=world["base"], encoder_root=world["enc"])
    assert model.provenance["import"]["flavour"] == "naivemc"
    assert model.lora_adapters == ["text"] and not model.prefix_tokens
    assert "folder name says damc" in caplog.text
    # pretraining-style select layer -1 is taken from the config as well
    src = write_released(tmp_path / "l1", "vision", "naivemc", world["vocab"], seed=8)
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_vision_select_layer"] = -1
    (src / "config.json").write_text(json.dumps(cfg))
    model = import_modelcompose(src, tmp_path / "out-l1", base=world["base"], encoder_root=world["enc"])
    assert model.adapters["image"].config.select_layer == -1


def test_bad_released_files_are_named(world, tmp_path):
    src = write_released(tmp_path, "vision", "damc", world["vocab"], seed=9)
    state = torch.load(src / "adapter_model.bin", weights_only=True)
    good = dict(state)
    del state["model.layers.1.mlp.down_proj.lora_B.vision.weight"]
    torch.save(state, src / "adapter_model.bin")
    with pytest.raises(
        ValueError, match=r"missing 1 key\(s\): model\.layers\.1\.mlp\.down_proj\.lora_B\.vision\.weight"
    ):
        import_modelcompose(src, tmp_path / "a", base=world["base"], encoder_root=world["enc"])
    torch.save({**good, "model.mm_projector.0.weight": torch.zeros(2)}, src / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"unknown role.*model\.mm_projector\.0\.weight"):
        import_modelcompose(src, tmp_path / "b", base=world["base"], encoder_root=world["enc"])
    torch.save({**good, "model.modal_projectors.vision.2.bias": torch.zeros(3)}, src / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"model\.modal_projectors\.vision\.2\.bias: file \(3,\)"):
        import_modelcompose(src, tmp_path / "c", base=world["base"], encoder_root=world["enc"])
    torch.save(good, src / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"mm_vision_encoder = '/mnt/cluster.*clip-vit-large-patch14-336"):
        import_modelcompose(src, tmp_path / "d", base=world["base"])  # no --encoder-root
    assert not any((tmp_path / n).exists() for n in "abcd")  # nothing half-written


def test_malicious_pickle_is_refused_and_never_executed(world, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    src = write_released(tmp_path, "audio", "naivemc", world["vocab"], seed=11)
    state = torch.load(src / "adapter_model.bin", weights_only=True)
    state["model.modal_projectors.audio.audio_query_tokens"] = Payload()
    torch.save(state, src / "adapter_model.bin")
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused to load"):
        import_modelcompose(src, tmp_path / "out", base=world["base"], encoder_root=world["enc"])
    _with_import_command(monkeypatch)
    rc = cli.main(
        [
            "import",
            "modelcompose",
            str(src),
            "--out",
            str(tmp_path / "out2"),
            "--base",
            str(world["base"]),
            "--encoder-root",
            str(world["enc"]),
        ]
    )
    assert rc == 1 and "refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_an_import_recipe_imports_the_same_model_again_byte_for_byte(world, tmp_path, monkeypatch):
    from mcomp.output_record import CARD_NAME, RECIPE_NAME
    from tests.test_train_identity import files_of

    _with_import_command(monkeypatch)
    first, again = tmp_path / "first", tmp_path / "again"
    src = world["released"]["vision", "damc"]
    argv = ["import", "modelcompose", str(src), "--base", str(world["base"]), "--encoder-root", str(world["enc"])]
    assert cli.main([*argv, "--out", str(first)]) == 0
    assert cli.main(["import", "modelcompose", "--from", str(first / RECIPE_NAME), "--out", str(again)]) == 0
    assert files_of(again) == files_of(first)  # the encoder weights are named relative to the model directory
    assert "| flavour | damc |" in (first / CARD_NAME).read_text()
    assert mcomp.load(again).modalities == ["image"]


def _with_import_command(monkeypatch):
    if "import_model" not in cli.SUBCOMMANDS:  # until the lead registers it
        monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, "import_model"])


def test_cli_import_compose_eval_four_modalities(world, tmp_path, monkeypatch, capsys):
    from mcomp.benchmarks.mcub.synthetic import write_benchmark

    _with_import_command(monkeypatch)
    dirs = {}
    for m, mc in (("vision", "image"), ("audio", "audio"), ("video", "video"), ("point", "point")):
        dirs[mc] = tmp_path / f"{m}-damc"
        assert (
            cli.main(
                [
                    "import",
                    "modelcompose",
                    str(world["released"][m, "damc"]),
                    "--out",
                    str(dirs[mc]),
                    "--base",
                    str(world["base"]),
                    "--encoder-root",
                    str(world["enc"]),
                ]
            )
            == 0
        )
    models = ",".join(f"{m}={d}" for m, d in dirs.items())
    assert cli.main(["compose", "--models", models, "--method", "damc", "--out", str(tmp_path / "mcub4-damc")]) == 0
    data = tmp_path / "data"
    write_benchmark(data, n=2)
    monkeypatch.setattr(cli, "SUBCOMMANDS", sorted({*cli.SUBCOMMANDS, "eval"}))
    rc = cli.main(
        [
            "eval",
            "--model",
            str(tmp_path / "mcub4-damc"),
            "--task",
            "mcub4",
            "--data-root",
            str(data),
            "--mode",
            "generate",
            "--out",
            str(tmp_path / "run"),
            "--max-new-tokens",
            "2",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"][0]["n_samples"] == 2 and results["metrics"][0]["n_errors"] == 0
