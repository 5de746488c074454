"""Prompts and training tokens as the published ModelCompose code makes them (issue 27, items 3 and 5),
compared with the published rules restated in `tests/modelcompose_reference.py` (not with mcomp itself).
The same comparisons on the real Vicuna vocabulary are in `tests/test_llama_tokenizer.py`."""

from __future__ import annotations

import json

import pytest

from mcomp.conversation import IGNORE_INDEX, get_template
from mcomp.errors import SampleError
from tests.modelcompose_reference import published_labels, published_modal_tokens, published_prompt


def turns(*pairs) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


TRAINING_CASES = {
    "one round": turns(("human", "image: <image>\nWhat colour is it?"), ("gpt", "red")),
    "answer of two lines": turns(("human", "<image>\nDescribe it."), ("gpt", "A red cube.\nIt is small.")),
    "first turn from gpt": turns(("gpt", "Hello."), ("human", "<image> Shape?"), ("gpt", "a cube")),
    "two images": turns(("human", "<image> and <image>: same colour?"), ("gpt", "yes")),
    "text only": turns(("human", "Name a colour."), ("gpt", "blue")),
}


@pytest.mark.parametrize("case", sorted(TRAINING_CASES))
def test_training_tokens_and_labels_follow_the_published_preprocess(tiny_model, case):
    conversation = TRAINING_CASES[case]
    tags = tiny_model.placeholder_ids
    text = published_prompt(conversation)
    want_ids = published_modal_tokens(text, tiny_model.tokenizer, tags)
    want_labels = published_labels(text, want_ids, tiny_model.tokenizer, tags)
    ids, labels = tiny_model.conversation_ids(conversation)
    assert ids == want_ids
    assert labels == want_labels
    assert any(t != IGNORE_INDEX for t in labels)  # the case is not one the rule drops


def test_a_tokenization_mismatch_is_refused_where_the_published_code_drops_the_sample(tiny_model):
    """The tiny tokenizer spells "USER" after "</s>" without the word-start mark, so the second round
    is one token longer whole than alone: the published rule masks the whole sample; mcomp says so."""
    conversation = turns(("human", "<image> Colour?"), ("gpt", "red"), ("human", "Shape?"), ("gpt", "a cube"))
    text = published_prompt(conversation)
    ids = published_modal_tokens(text, tiny_model.tokenizer, tiny_model.placeholder_ids)
    assert set(published_labels(text, ids, tiny_model.tokenizer, tiny_model.placeholder_ids)) == {IGNORE_INDEX}
    with pytest.raises(
        SampleError,
        match=r"tokenization mismatch: the rounds add up to \d+ tokens, "
        r"the conversation has \d+ \(the published preprocess would silently drop",
    ):
        tiny_model.conversation_ids(conversation)


def test_turns_out_of_order_are_refused(tiny_model):
    with pytest.raises(SampleError, match=r"conversations\[3\] is from 'human' where 'gpt' is expected"):
        tiny_model.conversation_ids(turns(("human", "a"), ("gpt", "b"), ("human", "c"), ("human", "d")))
    with pytest.raises(SampleError, match="no assistant answer"):
        tiny_model.conversation_ids(turns(("human", "a"), ("gpt", None)))


# --- evaluation prompts from question files (item 3) -----------------------------------------------

QUESTION_LAYOUTS = {
    "usual": turns(("human", "<image>\nWhat is it?"), ("gpt", None)),
    "gpt turn with a value": turns(("human", "<image>\nWhat is it?"), ("gpt", "A")),
    "several rounds": turns(("human", "<image>\nWhat is it?"), ("gpt", "A cube."), ("human", "Colour?"), ("gpt", None)),
    "no gpt turn": turns(("human", "<image>\nWhat is it?")),
    "first turn from gpt": turns(("gpt", "Hi."), ("human", "<image>\nWhat is it?"), ("gpt", None)),
    "placeholder in a later round": turns(
        ("human", "Ready?"), ("gpt", "Yes."), ("human", "<image> Now?"), ("gpt", None)
    ),
}


@pytest.fixture()
def question_file(tmp_path, image_files):
    def write(conversations: dict[str, list[dict]], media=True) -> list:
        from mcomp.benchmarks.mcub.data import read_questions

        image = image_files["png"].name
        (tmp_path / image).write_bytes(image_files["png"].read_bytes())
        entries = [
            {"id": name, "conversations": conv, "modal_inputs": {"vision": [image]} if media else {}}
            for name, conv in conversations.items()
        ]
        (tmp_path / "q.json").write_text(json.dumps(entries))
        return read_questions(tmp_path / "q.json", "s", tmp_path)

    return write


def test_question_files_in_other_layouts_render_the_whole_conversation(tiny_model, question_file):
    from mcomp.benchmarks.mcub.prompting import build_prompt

    samples = question_file(QUESTION_LAYOUTS)
    for sample in samples:
        prompt, media, ignored = build_prompt(tiny_model, get_template("vicuna_v1"), sample, ["image"])
        assert prompt == published_prompt(QUESTION_LAYOUTS[sample.id]), sample.id
        assert list(media) == ["vision"] and not ignored
        assert tiny_model.tokenize(prompt) == published_modal_tokens(
            prompt, tiny_model.tokenizer, tiny_model.placeholder_ids
        )
    ends = {s.id: build_prompt(tiny_model, get_template("vicuna_v1"), s, ["image"]).text[-22:] for s in samples}
    assert ends["no gpt turn"].endswith("What is it? ")  # no generation cue: the published prompt has none
    assert ends["gpt turn with a value"].endswith("ASSISTANT: A</s>")


def test_media_without_a_placeholder_are_not_seen_as_published_or_prefixed_on_request(tiny_model, question_file):
    from mcomp.benchmarks.mcub.prompting import build_prompt

    conversation = turns(("human", "What is it?"), ("gpt", None))
    (sample,) = question_file({"bare": conversation})
    prompt, media, ignored = build_prompt(tiny_model, get_template("vicuna_v1"), sample, ["image"])
    assert prompt == published_prompt(conversation) and media == {} and ignored
    prompt, media, ignored = build_prompt(tiny_model, get_template("vicuna_v1"), sample, ["image"], "prefix")
    assert prompt == published_prompt(turns(("human", "image: <image>\nWhat is it?"), ("gpt", None)))
    assert list(media) == ["vision"] and not ignored


def test_question_file_with_turns_out_of_order_is_refused(question_file):
    with pytest.raises(ValueError, match=r"q.json: entry 0 \(id 'bad'\): conversations\[1\] is from 'human'"):
        question_file({"bad": turns(("human", "a <image>"), ("human", "b"))})


def test_runner_records_media_left_unseen(tiny_model, tmp_path, image_files):
    """An eval run over a file without placeholders: every record says its media were not used, the
    model runs on the text alone, and the results name the policy."""
    from mcomp.benchmarks.mcub.runner import evaluate
    from mcomp.benchmarks.mcub.tasks import parse_task

    image = image_files["png"].name
    (tmp_path / image).write_bytes(image_files["png"].read_bytes())
    questions = [
        {
            "id": f"q{i}",
            "conversations": turns(("human", f"Which? {i}\nA. red\nB. blue"), ("gpt", None)),
            "modal_inputs": {"vision": [image]},
        }
        for i in range(2)
    ]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(
        json.dumps([{"id": q["id"], "conversations": turns(("gpt", "A"))} for q in questions])
    )
    task = parse_task(
        {
            "name": "t",
            "answers": "a.json",
            "subsets": [{"name": "s", "questions": "q.json", "modalities": ["image"]}],
            "modes": {"generate": {"scorer": "first_letter", "max_new_tokens": 2}},
        },
        "t.yaml",
    )
    results = evaluate(tiny_model, task, tmp_path, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [r["media_ignored"] for r in records] == [True, True] and not any(r["error"] for r in records)
    assert all("<image>" not in r["prompt"] for r in records)
    assert results["prompt"]["media_without_placeholder"] == "ignore"
