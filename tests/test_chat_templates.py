"""Base LLMs with their own chat templates (template "chat"): tiny models of each family, a locally built
tokenizer carrying that family's special tokens and chat template (data in the family's format), and
prompts, training labels, stop tokens, training and composition checked against `apply_chat_template`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mcomp.conversation import IGNORE_INDEX, ChatTemplate
from tests.composition_fixtures import write_audio_data, write_image_data
from tests.test_families import tiny_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPLATE_DIR = Path(__file__).parent / "data" / "chat_templates"  # real templates, as data (SOURCES.md)
# family -> (architecture in tests/test_families.py, special tokens the template uses, bos/eos overrides, other
# added tokens); the template is the family's own, read from TEMPLATE_DIR/<family>.jinja
TEMPLATES = {
    "qwen2.5": ("qwen2", ["<|im_start|>", "<|im_end|>"], {}, ["<tool_call>", "</tool_call>"]),
    "qwen3": ("qwen3", ["<|im_start|>", "<|im_end|>"], {}, ["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "llama-3": (
        "llama",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
        {"bos_token": "<|begin_of_text|>"},
        [],
    ),
    "gemma-2": ("gemma2", ["<start_of_turn>", "<end_of_turn>"], {}, []),
    "gemma-3": ("gemma3_text", ["<start_of_turn>", "<end_of_turn>"], {}, []),
    "mistral": ("mistral", ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]"], {}, []),
    "phi-3": ("phi3", ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>"], {}, []),
}


def chat_template(name: str) -> str:
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def family_tokenizer(name: str):
    from mcomp.tiny import build_tokenizer

    _, special, overrides, plain = TEMPLATES[name]
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [*special, "<image>", "<audio>"], **overrides})
    tokenizer.add_tokens(plain)
    tokenizer.chat_template = chat_template(name)
    return tokenizer


def reference_ids(tokenizer, messages, generate: bool, sentinels: dict[str, int]) -> list[int]:
    """The template's own rendering, tokenised as transformers does, placeholders substituted."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generate)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [sentinels.get(tokenizer.convert_ids_to_tokens(t), t) for t in ids]


def chat_model(name: str, adapters):
    from mcomp.model import MultimodalLM

    tokenizer = family_tokenizer(name)
    llm = tiny_llm(TEMPLATES[name][0], len(tokenizer), tokenizer.pad_token_id)
    return MultimodalLM.build(llm, tokenizer, adapters, template="chat")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_prompts_labels_and_stops_follow_the_template(name):
    from mcomp.tiny import tiny_image_adapter_config

    model = chat_model(name, [tiny_image_adapter_config()])
    tokenizer, question = model.tokenizer, "<image>\nWhat colour is it?"
    sentinels = {"<image>": model.placeholder_ids["<image>"]}
    ids = model.tokenize(model.template.prompt(question))
    assert ids == reference_ids(tokenizer, [{"role": "user", "content": question}], True, sentinels)
    assert ids.count(sentinels["<image>"]) == 1

    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]
    turns += [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a cube"}]
    ids, labels = model.conversation_ids(turns)
    messages = [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 2, [t["value"] for t in turns])]
    assert ids == reference_ids(tokenizer, messages, False, sentinels)
    # the learned tokens are each answer as the whole rendering has it: from the end of the rendering up
    # to its generation prompt, through the answer's text and its end-of-turn tokens, and the tokens that
    # follow them in the rendering up to that answer too (a newline; the last answer's EOS); Qwen3's
    # last answer keeps the empty think block its template puts before it, its first does not
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    eot = "".join(tokenizer.convert_ids_to_tokens(model.template.end_of_turn))

    def ids_of(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def turn_end(rendering, answer, start):
        end = rendering.index(answer, start) + len(answer)
        return end + len(eot) if rendering.startswith(eot, end) else end

    learned, texts = [], []
    for k in (1, 3):
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        answer = messages[k]["content"]
        full_ids, through_ids = ids_of(full), ids_of(through)
        end = len(ids_of(full[: turn_end(full, answer, len(before))]))
        own_end = len(ids_of(through[: turn_end(through, answer, len(before))]))
        while own_end < len(through_ids) and end < len(full_ids) and through_ids[own_end] == full_ids[end]:
            end, own_end = end + 1, own_end + 1  # what follows the turn in both renderings (a newline, a last EOS)
        span = slice(len(ids_of(before)), end)
        learned += [labels[i] for i in range(span.start, span.stop)]
        texts.append(tokenizer.decode(full_ids[span]))
        assert all(t == IGNORE_INDEX for t in labels[: span.start][-3:])  # the question's end is masked
    assert [t for t in labels if t != IGNORE_INDEX] == learned
    assert texts[0].replace(" ", "").startswith("red" + eot) and "acube" + eot in texts[1].replace(" ", "")
    assert (name == "qwen3") == ("<think>" in texts[1]) and "<think>" not in texts[0]
    assert model.template.end_of_turn and set(model.template.end_of_turn) <= set(learned)  # the answer's end

    from mcomp.scoring import stop_ids

    assert set(model.template.end_of_turn) <= set(stop_ids(model))


QUESTION = "<image>\n<audio>\nWhat is the colour of the image?\nA. red\nB. green\nC. blue\nD. white"


def write_task(root):
    """A task over three image + audio questions (the MCUB format; the task's template is vicuna_v1)."""
    from mcomp.benchmarks.mcub.data import conversation

    questions, answers = [], []
    for i, letter in enumerate("ABC"):
        media = {"vision": [f"img{i}.png"], "audio": [f"aud{i}.wav"]}
        questions.append({"id": i, "conversations": conversation(QUESTION, None), "modal_inputs": media})
        answers.append({"id": i, "conversations": conversation(QUESTION, letter)})
    (root / "q.json").write_text(json.dumps(questions))
    (root / "a.json").write_text(json.dumps(answers))
    task = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tasks" / "mcub4.yaml").read_text())
    task.update(name="chat-check", answers="a.json")
    task["subsets"] = [{"name": "IA", "questions": "q.json", "modalities": ["image", "audio"]}]
    (root / "task.yaml").write_text(yaml.safe_dump(task))
    return root / "task.yaml"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_chat_model_trains_composes_and_scores(name, tmp_path):
    import mcomp
    from mcomp.cli import main
    from mcomp.compose import compose
    from mcomp.data import load_conversation_data
    from mcomp.tiny import tiny_audio_adapter_config, tiny_image_adapter_config
    from mcomp.train import TrainConfig, train

    data = {"image": write_image_data(tmp_path), "audio": write_audio_data(tmp_path)}
    adapters = {"image": tiny_image_adapter_config(), "audio": tiny_audio_adapter_config()}
    paths = {}
    for modality, decoupled in (("image", False), ("audio", True)):
        model = chat_model(name, [adapters[modality]])
        samples = load_conversation_data(data[modality])
        train(model, samples, TrainConfig(stage=1, max_steps=2, batch_size=3), tmp_path / f"s1-{modality}")
        cfg = TrainConfig(stage=2, decoupled=decoupled, lora_r=4, lora_alpha=8, max_steps=2, batch_size=3)
        train(model, samples, cfg, tmp_path / f"s2-{modality}")
        model.save_pretrained(tmp_path / modality)
        paths[modality] = tmp_path / modality
        assert mcomp.load(tmp_path / modality).template.name == "chat"
    media = {"image": str(tmp_path / "img0.png"), "audio": str(tmp_path / "aud1.wav")}
    task = write_task(tmp_path)
    for method in ("naivemc", "damc"):
        composed = compose(paths, method=method, merge="ties", convert=True)
        prompt = composed.template.prompt("<image>\n<audio>\nWhat do they share?")
        assert all(torch.isfinite(torch.tensor(s.logprob)) for s in composed.loglikelihood(prompt, [" red"], media))
        assert isinstance(composed.generate([prompt], [media], max_new_tokens=4)[0], str)
        composed.save_pretrained(tmp_path / method)
        for mode in ("loglik", "generate"):
            run = tmp_path / f"run-{method}-{mode}"
            args = ["eval", "--model", str(tmp_path / method), "--task", str(task), "--data-root", str(tmp_path)]
            assert main([*args, "--mode", mode, "--max-new-tokens", "4", "--out", str(run)]) == 0
            records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
            assert len(records) == 3 and all(r["error"] is None for r in records)
            # prompted with the model's own template, not the task's vicuna_v1
            want = composed.template.render([("human", QUESTION), ("gpt", None)])
            assert records[0]["prompt"] == want


def test_a_tokenizer_without_a_chat_template_is_refused_with_what_to_do():
    from mcomp.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"no chat template .*use a template of configs/templates"):
        ChatTemplate(tokenizer)


def test_mcomp_train_takes_the_bases_chat_template_or_says_what_to_pass(tmp_path, capsys):
    from mcomp.checkpoint import read_config
    from mcomp.cli import main

    data = write_image_data(tmp_path)
    base = tmp_path / "qwen-base"
    tokenizer = family_tokenizer("qwen2.5")
    tiny_llm("qwen2", len(tokenizer), tokenizer.pad_token_id).save_pretrained(base)
    tokenizer.save_pretrained(base)
    args = ["train", "--base", str(base), "--adapter", "tiny:image", "--data", str(data), "--stage", "1"]
    args += ["--max-steps", "1", "--batch-size", "3"]
    assert main([*args, "--template", "chat", "--out", str(tmp_path / "ok")]) == 0
    assert read_config(tmp_path / "ok").template == "chat"
    capsys.readouterr()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: (hidden){% endfor %}"  # drops the text
    tokenizer.save_pretrained(base)
    assert main([*args, "--template", "chat", "--out", str(tmp_path / "dropped")]) != 0
    assert "cannot place a media placeholder: use a template of configs/templates" in capsys.readouterr().err
