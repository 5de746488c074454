"""The composed model core: splicing, left-padded batches, labels, generate and loglikelihood."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mcomp.conversation import get_template
from mcomp.errors import MediaBatchError, PlaceholderMismatchError
from mcomp.model import IGNORE_INDEX


def manual_embeds(model, prompt: str, image_path, cont_ids: list[int]) -> torch.Tensor:
    """Splice by hand: embed the text chunks, insert the adapter output at the one placeholder."""
    tok = model.tokenizer
    before, after = prompt.split("<image>")
    ids_before = tok(before)["input_ids"]  # BOS + chunk
    ids_after = tok(after)["input_ids"][1:]  # chunk tokenised on its own, its BOS dropped
    adapter = model.adapters["image"]
    feats = adapter(adapter.prepare([image_path]))[0]
    embed = model.llm.get_input_embeddings()
    return torch.cat(
        [
            embed(torch.tensor(ids_before)),
            feats,
            embed(torch.tensor(ids_after + cont_ids)),
        ]
    )[None]


def test_template_renders_the_published_prompt():
    t = get_template("vicuna_v1")
    assert t.prompt("Q?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: Q? ASSISTANT:"
    )
    assert t.render([("human", "hi"), ("gpt", "yo"), ("human", "again"), ("gpt", None)]).endswith(
        "USER: hi ASSISTANT: yo</s>USER: again ASSISTANT:"
    )


def test_chunks_are_tokenised_independently(tiny_model):
    prompt = "look: <image>\nwhat colour?"
    ids = tiny_model.tokenize(prompt)
    tok = tiny_model.tokenizer
    sentinel = tiny_model.placeholder_ids["<image>"]
    assert ids.count(sentinel) == 1
    k = ids.index(sentinel)
    assert ids[:k] == tok("look: ")["input_ids"]
    assert ids[k + 1 :] == tok("\nwhat colour?")["input_ids"][1:]


def test_loglikelihood_equals_plain_forward_over_spliced_embeddings(tiny_model, image_files):
    model = tiny_model
    prompt = model.template.prompt("image: <image>\nWhat is it?")
    options = [" A", " red circle", " a blue square on white"]  # different lengths: left padding in the batch
    results = model.loglikelihood(prompt, options, {"image": str(image_files["png"])})
    for option, res in zip(options, results):
        cont = model.tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            embeds = manual_embeds(model, prompt, image_files["png"], cont)
            logp = F.log_softmax(model.llm(inputs_embeds=embeds).logits[0].float(), -1)
        n = embeds.shape[1]
        positions = range(n - len(cont) - 1, n - 1)
        expected = sum(logp[p, t].item() for p, t in zip(positions, cont))
        greedy = all(logp[p].argmax().item() == t for p, t in zip(positions, cont))
        assert res.num_tokens == len(cont)
        assert res.logprob == pytest.approx(expected, abs=1e-4)
        assert res.is_greedy == greedy


def test_left_padded_batch_matches_single_samples(tiny_model, image_files):
    model = tiny_model
    prompts = [
        model.template.prompt("image: <image>\nShort?"),
        model.template.prompt("Two images <image> and <image>, which one is brighter and larger?"),
    ]
    media = [{"image": str(image_files["png"])}, {"vision": [str(image_files["jpg"]), str(image_files["png"])]}]
    batch = model.prepare_inputs(prompts, media)
    assert batch.attention_mask[0].sum() < batch.attention_mask[1].sum()
    assert batch.attention_mask[0, 0] == 0  # left padding
    with torch.no_grad():
        batch_logits = model(batch).logits
        for b in range(2):
            single = model.prepare_inputs([prompts[b]], [media[b]])
            n = single.inputs_embeds.shape[1]
            torch.testing.assert_close(batch_logits[b, -n:], model(single).logits[0], atol=1e-4, rtol=1e-4)
    gen_batch = model.generate(prompts, media, max_new_tokens=6)
    gen_single = [model.generate([p], [m], max_new_tokens=6)[0] for p, m in zip(prompts, media)]
    assert gen_batch == gen_single


def test_generate_is_greedy_over_the_forward_pass(tiny_model, image_files):
    model = tiny_model
    prompt = model.template.prompt("<image> name it")
    media = [{"image": str(image_files["png"])}]
    with torch.no_grad():
        first = model(model.prepare_inputs([prompt], media)).logits[0, -1].argmax().item()
        out = model.llm.generate(
            **{
                k: v
                for k, v in vars(model.prepare_inputs([prompt], media)).items()
                if k in ("inputs_embeds", "attention_mask")
            },
            max_new_tokens=1,
            do_sample=False,
        )
    assert out[0, -1].item() == first
    text = model.generate([prompt], media, max_new_tokens=4)[0]
    assert isinstance(text, str)
    assert model.generate([prompt], media, max_new_tokens=4)[0] == text  # deterministic


def test_labels_cover_only_the_continuation(tiny_model, image_files):
    model = tiny_model
    prompt = model.template.prompt("<image> colour?")
    inputs = model.prepare_inputs([prompt], [{"image": str(image_files["png"])}], continuations=[" red</s>"])
    cont = inputs.continuation_ids[0]
    labels = inputs.labels[0]
    assert labels[-len(cont) :].tolist() == cont
    assert (labels[: -len(cont)] == IGNORE_INDEX).all()
    image_positions = inputs.modality_ids[0] == 0
    assert image_positions.sum() == model.adapters["image"].num_tokens
    assert (labels[image_positions] == IGNORE_INDEX).all()
    out = model(inputs)
    logits = out.logits[0, -len(cont) - 1 : -1]
    expected = F.cross_entropy(logits.float(), torch.tensor(cont))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()  # gradients reach the projector, not the frozen encoder
    adapter = model.adapters["image"]
    assert adapter.projector[0].weight.grad is not None and adapter.projector[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.encoder.parameters())


def test_placeholder_and_media_disagreement_is_a_clear_error(tiny_model, image_files):
    model = tiny_model
    png = str(image_files["png"])
    with pytest.raises(
        PlaceholderMismatchError, match=r"sample 0: the prompt has 2 <image> placeholder\(s\) but 1 image"
    ):
        model.prepare_inputs(["<image> and <image>"], [{"image": png}])
    with pytest.raises(PlaceholderMismatchError, match=r"sample 1: the prompt has 0 <image>.* but 1 image"):
        model.prepare_inputs(["<image>", "no tag"], [{"image": png}, {"image": png}])
    with pytest.raises(PlaceholderMismatchError, match="no adapter for modality 'audio'"):
        model.prepare_inputs(["<image>"], [{"image": png, "audio": "x.wav"}])


def test_bad_file_in_batch_names_sample_and_file(tiny_model, image_files):
    with pytest.raises(MediaBatchError) as err:
        tiny_model.prepare_inputs(
            ["<image>", "<image>"], [{"image": str(image_files["png"])}, {"image": str(image_files["truncated"])}]
        )
    assert list(err.value.failures) == [1]
    assert "truncated.png" in str(err.value)
