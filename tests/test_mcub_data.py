"""Reading the published MCUB-family files, the `datasets` export, and task files."""

from __future__ import annotations

import json
import os

import pytest

from mcomp.benchmarks.mcub.data import (
    as_hf_dataset,
    check_answers_match,
    id_key,
    read_answer_file,
    read_questions,
)
from mcomp.benchmarks.mcub.synthetic import write_benchmark
from mcomp.benchmarks.mcub.tasks import available_tasks, load_task, parse_task


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return write_benchmark(
        root, n=3, per_modality=2, class_names=list(load_task("modelnet40").target_params["class_names"])
    )


def test_shipped_tasks():
    assert set(available_tasks()) >= {"mcub4", "mcub3", "avqa", "music_avqa", "modelnet40"}
    mcub3 = load_task("mcub3")
    assert [s.name for s in mcub3.subsets] == [
        "image-audio-video",
        "audio-video-pointcloud",
        "image-audio-pointcloud",
        "image-video-pointcloud",
    ]
    assert mcub3.subsets[1].modalities == ("audio", "video", "point")
    assert load_task("mcub4").template == "vicuna_v1"
    assert load_task("mcub4").modality_order == ("image", "audio", "video", "point")
    names = load_task("modelnet40").target_params["class_names"]
    assert len(names) == 40 and names[0] == "airplane" and names[15] == "flower pot" and names[-1] == "xbox"
    assert load_task("modelnet40").default_mode == "loglik"
    assert len(load_task("avqa").subsets) == 7 and len(load_task("music_avqa").subsets) == 7


def test_unknown_task_and_bad_task_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'mcub5'; available: .*mcub4"):
        load_task("mcub5")
    with pytest.raises(FileNotFoundError, match="task file not found"):
        load_task(str(tmp_path / "none.yaml"))
    base = {
        "name": "t",
        "answers": "a.json",
        "subsets": [{"name": "s", "questions": "q.json", "modalities": []}],
        "modes": {"generate": {"scorer": "first_letter"}},
    }
    assert parse_task(base, "t.yaml").default_mode == "generate"
    with pytest.raises(ValueError, match=r"t.yaml: unknown field\(s\) \['subset'\]"):
        parse_task({**base, "subset": []}, "t.yaml")
    with pytest.raises(ValueError, match="t.yaml: modes.generate: unknown scorer function 'bogus'"):
        parse_task({**base, "modes": {"generate": {"scorer": "bogus"}}}, "t.yaml")
    with pytest.raises(ValueError, match="t.yaml: modes.loglik: missing field 'options'"):
        parse_task({**base, "modes": {"loglik": {"scorer": "exact"}}}, "t.yaml")
    with pytest.raises(ValueError, match="no mode 'loglik'"):
        parse_task(base, "t.yaml").mode("loglik")


def test_read_published_question_file(bench):
    samples = read_questions(bench / "data/test/MCUB-4.json", "MCUB-4", bench)
    assert len(samples) == 3
    raw = json.loads((bench / "data/test/MCUB-4.json").read_text())
    for s, entry in zip(samples, raw):
        assert s.id == entry["id"] and s.error is None
        assert s.question == entry["conversations"][0]["value"]  # verbatim, placeholders included
        assert s.question.startswith("image: <image>\naudio: <audio>\nvideo: <video>\npoint: <point>\n")
        assert list(s.media) == ["vision", "audio", "video", "point"]
        for key, paths in s.media.items():
            assert paths == [os.path.join(str(bench), p) for p in entry["modal_inputs"][key]]
            assert all(os.path.isfile(p) for p in paths)
    avqa = read_questions(bench / "data/test/avqa-test_mm_image+audio.json", "image+audio", bench)
    assert all(isinstance(s.id, int) for s in avqa)  # integer ids stay integers


def test_missing_media_is_recorded_not_dropped(bench, tmp_path):
    entries = json.loads((bench / "data/test/MCUB-4.json").read_text())
    entries[1]["modal_inputs"]["audio"] = ["data/media/aud/gone.wav"]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(entries))
    samples = read_questions(path, "MCUB-4", bench)
    assert len(samples) == 3
    assert samples[0].error is None and samples[2].error is None
    assert "missing media" in samples[1].error and "gone.wav" in samples[1].error and "audio" in samples[1].error


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e[1].pop("conversations"), r"q.json: entry 1 \(id 'mcub-4_0001'\): field 'conversations'"),
        (lambda e: e[2].update(id=e[0]["id"]), "id 'mcub-4_0000' occurs twice"),
        (lambda e: e[0].update(id={"a": 1}), "entry 0: 'id' must be a JSON scalar"),
        (lambda e: e[0]["conversations"][0].update(value=""), r"conversations\[0\].value \(the question\)"),
        (
            lambda e: e[0].update(modal_inputs={"vision": [3]}),
            r"modal_inputs\['vision'\] must be a path or a list of paths",
        ),
    ],
)
def test_malformed_question_files_name_the_entry(bench, tmp_path, mutate, message):
    entries = json.loads((bench / "data/test/MCUB-4.json").read_text())
    mutate(entries)
    path = tmp_path / "q.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message):
        read_questions(path, "MCUB-4", bench)


def test_answer_file_must_match_questions(bench, tmp_path):
    samples = read_questions(bench / "data/test/MCUB-4.json", "MCUB-4", bench)
    answers = read_answer_file(bench / "data/test/MCUB-answer.json")
    assert check_answers_match(samples, answers, "a", "q") == []
    music = read_answer_file(bench / "data/test/music-avqa-test_mm_answer.json")
    with pytest.raises(ValueError, match="does not match question file q: none of its 3 question id"):
        check_answers_match(samples, music, "music.json", "q")
    partial = {k: v for k, v in answers.items() if k != id_key(samples[0].id)}
    assert [s.id for s in check_answers_match(samples, partial, "a", "q")] == [samples[0].id]
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps([{"id": 1, "conversations": []}, {"id": 1, "conversations": [{"value": "B"}]}]))
    with pytest.raises(ValueError, match="id 1 occurs twice with different content"):
        read_answer_file(bad)
    bad.write_text(json.dumps({"id": 1}))
    with pytest.raises(ValueError, match="must be a JSON list"):
        read_answer_file(bad)


def test_datasets_export(bench):
    task = load_task("mcub3")
    answers = read_answer_file(bench / "data/test/MCUB-answer.json")
    samples = []
    for subset in task.subsets:
        samples += read_questions(bench / subset.questions, subset.name, bench)
    ds = as_hf_dataset(samples, answers, task.target_function())
    assert len(ds) == 12
    assert set(ds.column_names) == {
        "id",
        "subset",
        "index",
        "question",
        "vision",
        "audio",
        "video",
        "point",
        "target",
        "error",
    }
    row = ds[3]  # first sample of audio-video-pointcloud: no image
    assert row["subset"] == "audio-video-pointcloud" and row["vision"] == [] and len(row["point"]) == 1
    assert json.loads(row["id"]) == samples[3].id
    assert row["target"] == answers[id_key(samples[3].id)]["conversations"][-1]["value"]
    assert row["target"] in "ABCD" and row["error"] is None
