"""The synthetic world (mcomp.world): files decode with the project's own loaders and show their entity,
training/MCUB files follow their schemas, held-out entities stay held out, generation is reproducible."""

from __future__ import annotations

import collections
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from mcomp.modalities import MODALITIES as TABLE
from mcomp.world import MODALITIES, Entity, WorldManifest, generate_world, load_attribute_space, split_entities
from mcomp.world.datasets import MCUB_SUBSETS
from mcomp.world.questions import ANSWER_SUFFIX, LETTERS

MEDIA_KEY = {m: t.published_key for m, t in TABLE.items()}
TAG = {m: t.placeholder for m, t in TABLE.items()}
SPACE = load_attribute_space()
RGB = {c.name: np.asarray(c.rgb, dtype=float) for c in SPACE.colours}
PITCH = {c.name: c.pitch_hz for c in SPACE.colours}
OPTION = re.compile(r"^([A-D])\. (.+)$", re.M)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> WorldManifest:
    return generate_world(tmp_path_factory.mktemp("world") / "w", size="test", seed=0)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nearest_colour(pixels: np.ndarray) -> str:
    """The palette colour most object pixels are closest to: saturated or dark ones (the background
    is pale and grey, black is the one unsaturated colour)."""
    px = pixels.reshape(-1, 3).astype(float)
    hi, lo = px.max(axis=1), px.min(axis=1)
    px = px[(((hi - lo) / np.maximum(hi, 1) > 0.6) & (hi > 100)) | (hi < 70)]
    assert len(px) > 0.05 * pixels.reshape(-1, 3).shape[0], "the object covers almost nothing"
    names = list(RGB)
    palette = np.stack([RGB[n] for n in names])
    votes = np.bincount(((px[:, None, :] - palette[None]) ** 2).sum(-1).argmin(axis=1), minlength=len(names))
    return names[int(votes.argmax())]


def _media(world, suffix):
    return [(rel, Entity.from_key(key)) for rel, key in world.labels().items() if rel.endswith(suffix)]


# --- files ----------------------------------------------------------------------------------------
def test_manifest_lists_every_file_intact(world):
    assert world.verify() == []
    again = WorldManifest.load(world.root)
    assert again.files == world.files and again.seed == 0 and again.size == "test"
    on_disk = {p.relative_to(world.root).as_posix() for p in world.root.rglob("*") if p.is_file()}
    assert on_disk == set(world.files) | {"manifest.json"}
    pretrain = sum(world.counts["media"]["pretrain"].values())
    assert pretrain == 4 * world.config["pretrain"]["media_per_modality"]
    assert world.counts["media_files"] == len(world.labels()) + pretrain  # labels: named entities only
    assert all(
        world.counts["mcub_questions"]["test"][s] == world.config["mcub"]["test_questions"] for s in MCUB_SUBSETS
    )


def test_images_show_the_entity_colour(world):
    from mcomp.encoders.image import load_image

    for rel, entity in _media(world, ".png"):
        img = load_image(str(world.path(rel)))
        assert img.size == (64, 64)
        assert _nearest_colour(np.asarray(img)) == entity.colour, rel


def test_videos_decode_with_the_entity_colour(world):
    from mcomp.encoders.video import read_video_frames

    for rel, entity in _media(world, ".mp4")[:40]:
        frames = read_video_frames(str(world.path(rel)), 8)
        assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
        assert _nearest_colour(np.stack(frames)) == entity.colour, rel
        assert not np.array_equal(frames[0], frames[-1]), f"{rel}: the object does not move"


def test_audio_dominant_frequency_is_the_colour_pitch(world):
    from mcomp.encoders.audio import load_audio

    for rel, entity in _media(world, ".wav"):
        audio = load_audio(str(world.path(rel)))
        assert audio.sample_rate == 16000 and audio.waveform.shape[0] == 1
        wave = audio.waveform[0].numpy()
        spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
        peak = np.fft.rfftfreq(len(wave), 1 / audio.sample_rate)[spectrum.argmax()]
        assert abs(np.log(peak / PITCH[entity.colour])) < np.log(1.08), (rel, peak)


def test_encoder_pretraining_renders_show_their_listed_colour_and_cover_every_shape(world):
    """Every shape in random colours: the listed RGB is the fill of the image's object, the listed
    pitch the clip's dominant frequency; no pretraining file is a labelled (named) entity render."""
    from mcomp.encoders.audio import load_audio
    from mcomp.encoders.image import load_image

    labels = world.labels()
    n = world.config["pretrain"]["media_per_modality"]
    for modality in MODALITIES:
        items = json.loads(world.pretrain_json(modality).read_text())
        assert len(items) == n
        counts = collections.Counter(it["shape"] for it in items)
        assert set(counts) == set(SPACE.shape_names) and max(counts.values()) - min(counts.values()) <= 1
        for it in items:
            assert f"pretrain/{it['file']}" in world.files and f"pretrain/{it['file']}" not in labels
    images = json.loads(world.pretrain_json("image").read_text())
    assert len({tuple(it["rgb"]) for it in images}) == n  # not the palette
    for it in images:
        px = np.asarray(load_image(str(world.pretrain_json("image").parent / it["file"]))).reshape(-1, 3).astype(int)
        near = (np.abs(px - np.asarray(it["rgb"])).max(axis=1) <= 3).mean()
        assert near > 0.02, (it, near)
    for it in json.loads(world.pretrain_json("audio").read_text())[:20]:
        wave = load_audio(str(world.pretrain_json("audio").parent / it["file"])).waveform[0].numpy()
        spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
        peak = np.fft.rfftfreq(len(wave), 1 / 16000)[spectrum.argmax()]
        assert abs(np.log(peak / it["pitch_hz"])) < np.log(1.08), (it, peak)


@pytest.mark.parametrize("pitch", [220.0, 1670.6])
def test_audio_timbres_differ_in_the_fbank_the_encoder_sees(pitch):
    import torch

    from mcomp.encoders.audio import FbankFrontend
    from mcomp.world.render_audio import tone

    frontend, t = FbankFrontend(target_length=128), np.arange(16000) / 16000
    features = {}
    for shape in SPACE.shapes:
        fbank = frontend(torch.from_numpy(0.5 * tone(shape.timbre, pitch, t)).float())[:98].numpy()
        features[shape.name] = np.concatenate([fbank.mean(axis=0), fbank.std(axis=0)])
    names = list(features)
    distances = {(a, b): np.linalg.norm(features[a] - features[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    assert min(distances.values()) > 3.0, distances


def test_point_clouds_load_with_colours(world):
    from mcomp.encoders.point import read_point_file

    extents = collections.defaultdict(list)
    for rel, entity in _media(world, ".ply"):
        cloud = read_point_file(str(world.path(rel)))
        assert cloud.xyz.shape == (world.config["render"]["points"], 3) and cloud.rgb is not None
        mean = cloud.rgb.mean(axis=0) * 255
        assert min(RGB, key=lambda n: ((RGB[n] - mean) ** 2).sum()) == entity.colour, rel
        centred = cloud.xyz - cloud.xyz.mean(axis=0)
        radii = np.linalg.norm(centred, axis=1)
        extents[entity.shape].append(radii.std() / radii.mean())
    # a sphere's points lie at one radius; the other shapes' do not
    assert max(extents["sphere"]) < 0.1 < min(v for s, vals in extents.items() if s != "sphere" for v in vals)


# --- datasets -------------------------------------------------------------------------------------
def test_training_data_loads_and_matches_labels(world):
    from mcomp.data import load_conversation_data

    labels = world.labels()
    for split, path_of in (("train", world.train_json), ("dev", world.val_json)):
        allowed = {e.key for e in world.entity_split(split)}
        for modality in MODALITIES:
            path = path_of(modality)
            samples = load_conversation_data(path)
            assert samples and len(samples) == len(json.loads(path.read_text()))
            for s in samples:
                ((key, files),) = s.media.items()
                assert key == MEDIA_KEY[modality] and len(files) == 1
                entity = Entity.from_key(labels[Path(files[0]).relative_to(world.root).as_posix()])
                assert entity.key in allowed
                assert s.captions == {key: [entity.text]}  # the render's caption (labels.json), for distillation
                question, answer = s.conversations[0]["value"], s.conversations[1]["value"]
                assert question.startswith(f"{modality}: {TAG[modality]}\n") and question.count("<") == 1
                options = dict(OPTION.findall(question))
                if options:  # answered with the option's text
                    assert question.endswith("\n" + ANSWER_SUFFIX) and len(options) == 4
                    assert answer in options.values() and answer in (entity.text, entity.colour, entity.shape)
                else:
                    assert answer in (entity.text, entity.colour, entity.shape)


def test_heldout_entities_never_appear_in_training_media_or_options(world):
    heldout = world.entity_split("dev") + world.entity_split("test")
    train = set(world.entity_split("train"))
    assert not train & set(heldout) and len(train) + len(heldout) == len(SPACE.entities())
    assert {e.shape for e in train} == set(SPACE.shape_names) and {e.colour for e in train} == set(SPACE.colour_names)
    test_colours = [e.colour for e in world.entity_split("test")]
    assert len(set(test_colours)) == len(test_colours) == world.config["split"]["test_entities"]  # distinct
    labels = world.labels()
    assert all(Entity.from_key(k) in train for rel, k in labels.items() if rel.startswith("train/"))
    texts = {e.text for e in heldout}
    for modality in MODALITIES:
        for sample in json.loads(world.train_json(modality).read_text()):
            question = sample["conversations"][0]["value"]
            assert not any(f". {t}\n" in question for t in texts)


def _check_mcub_root(world, split):
    from mcomp.benchmarks.mcub.data import read_answer_file, read_questions

    root = world.mcub_root(split)
    answers = read_answer_file(world.mcub_answers(split))
    meta = {m["id"]: m for m in json.loads(world.mcub_meta(split).read_text())}
    labels = world.labels()
    held = set(world.entity_split(split))
    seen = 0
    for subset, modalities in MCUB_SUBSETS.items():
        raw = json.loads(world.mcub_questions(split, subset).read_text())
        samples = read_questions(world.mcub_questions(split, subset), subset, data_root=root)
        letters = collections.Counter()
        for entry, sample in zip(raw, samples):
            assert sample.error is None
            seen += 1
            turns = entry["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] and turns[1]["value"] is None
            question = turns[0]["value"]
            # one placeholder line per modality, canonical order, one file per placeholder
            head = "".join(f"{m}: {TAG[m]}\n" for m in modalities)
            assert question.startswith(head) and question.endswith("\n" + ANSWER_SUFFIX)
            assert set(entry["modal_inputs"]) == {MEDIA_KEY[m] for m in modalities}
            for m in modalities:
                assert question.count(TAG[m]) == len(entry["modal_inputs"][MEDIA_KEY[m]]) == 1
            options = OPTION.findall(question)
            assert [o[0] for o in options] == list(LETTERS) and len({o[1] for o in options}) == 4
            answer = answers[json.dumps(entry["id"])]["conversations"][-1]["value"]
            assert answer in LETTERS
            letters[answer] += 1
            info = meta[entry["id"]]
            assert info["answer"] == answer and dict(options)[answer] == info["answer_text"]
            inputs = [
                Entity.from_key(labels[f"mcub/{split}/{entry['modal_inputs'][MEDIA_KEY[m]][0]}"]) for m in modalities
            ]
            assert [e.key for e in inputs] == [info["inputs"][m] for m in modalities]
            if info["kind"] == "entity":
                assert len(set(inputs)) == 1 and inputs[0] in held and inputs[0].text == info["answer_text"]
            else:
                attr = info["shared_attribute"]
                other = "shape" if attr == "colour" else "colour"
                assert {e.attribute(attr) for e in inputs} == {info["answer_text"]}
                assert len({e.attribute(other) for e in inputs}) == len(inputs)
                for text in dict(options).values():  # no wrong option is shared by every input
                    if text != info["answer_text"]:
                        assert not all(text in (e.colour, e.shape) for e in inputs)
        assert max(letters.values()) - min(letters.get(x, 0) for x in LETTERS) <= 1, letters
    assert seen == len(answers) == len(meta)


def test_mcub_test_and_dev_follow_the_published_schema(world):
    _check_mcub_root(world, "test")
    _check_mcub_root(world, "dev")
    test_files = {f for f in world.files if f.startswith("mcub/test/media/")}
    dev_files = {f for f in world.files if f.startswith("mcub/dev/media/")}
    assert (
        test_files
        and dev_files
        and not {f.split("/", 2)[2] for f in test_files} & {f.split("/", 2)[2] for f in dev_files}
    )


def test_mcub_paths_match_the_shipped_task_files(world):
    from mcomp.benchmarks.mcub.tasks import load_task

    for name in ("mcub4", "mcub3"):
        task = load_task(name)
        assert (world.mcub_root("test") / task.answers).is_file()
        for subset in task.subsets:
            assert (world.mcub_root("test") / subset.questions).is_file(), subset.questions


def test_text_corpora(world):
    for name in ("commonality", "attribute_qa", "modality_qa"):
        samples = json.loads(world.text_file(name).read_text())
        assert len(samples) == world.config["text"][name]
        for s in samples:
            question, answer = (t["value"] for t in s["conversations"])
            assert "<" not in question and answer
            options = dict(OPTION.findall(question))
            if options:  # answered with the option's text
                assert answer in options.values() and len(options) == 4
    # the modality questions in text form: the answer is what the caption line says
    for s in json.loads(world.text_file("modality_qa").read_text()):
        question, answer = (t["value"] for t in s["conversations"])
        modality, caption = question.splitlines()[0].split(": ", 1)
        assert modality in ("image", "audio", "video", "point")
        asked = question.splitlines()[1]
        if asked.startswith("What colour"):
            assert answer == caption.split()[1]
        elif asked.startswith("What shape"):
            assert answer == caption.split()[2]
        else:
            assert answer == caption
    lines = world.text_file("sentences").read_text().splitlines()
    assert "A red cube is a cube that is red." in lines
    assert any(line.endswith("have in common: red.") for line in lines)


# --- reproducibility ------------------------------------------------------------------------------
def test_same_seed_gives_identical_bytes_and_another_seed_differs(world, tmp_path):
    again = generate_world(tmp_path / "again", size="test", seed=0, workers=2)  # also: parallel == serial
    assert {rel: _sha(again.path(rel)) for rel in again.files} == {rel: _sha(world.path(rel)) for rel in world.files}
    assert (again.root / "manifest.json").read_bytes() == (world.root / "manifest.json").read_bytes()
    other = generate_world(tmp_path / "other", size="test", seed=1)
    media = [rel for rel in world.files if "/media/" in rel]
    differ = [rel for rel in media if rel in other.files and other.files[rel]["sha256"] != world.files[rel]["sha256"]]
    assert len(differ) > 0.95 * len(media)


def test_existing_world_is_reused_and_other_folders_are_refused(world, tmp_path):
    stamp = (world.root / "manifest.json").stat().st_mtime_ns
    assert generate_world(world.root, size="test", seed=0).files == world.files
    assert (world.root / "manifest.json").stat().st_mtime_ns == stamp
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate_world(busy, size="test", seed=0)
    assert (busy / "notes.txt").read_text() == "mine"


def test_split_is_seeded_and_keeps_every_attribute_in_training():
    for seed in range(20):
        split = split_entities(SPACE, 6, 6, seed)
        assert split == split_entities(SPACE, 6, 6, seed)
        assert {e.shape for e in split.train} == set(SPACE.shape_names)
        assert {e.shape for e in split.test} == set(SPACE.shape_names)
        assert len({e.colour for e in split.dev}) == 6
    assert split_entities(SPACE, 6, 6, 0) != split_entities(SPACE, 6, 6, 1)


def test_a_config_without_a_text_corpus_size_is_refused_before_anything_is_written(tmp_path):
    import yaml

    from mcomp.resources import load_config

    cfg = load_config("world", "test.yaml")
    del cfg["text"]["modality_qa"]
    path = tmp_path / "no_modality_qa.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"text\.modality_qa"):
        generate_world(tmp_path / "w", size=str(path), seed=0)
    assert not (tmp_path / "w").exists()


def test_unknown_question_kind_is_named():
    from mcomp.world.questions import modality_question

    with pytest.raises(ValueError, match="'colours'"):
        modality_question("image", SPACE.entities()[0], "colours", SPACE.entities(), np.random.default_rng(0))
