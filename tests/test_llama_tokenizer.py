"""The real LLaMA/Vicuna-7B v1.5 tokenizer, rebuilt offline (tests/llama_vocab.py), against three references:
the npm package's own test cases, an independent merge-rank BPE, and the published code's slow tokenizer
(transformers 4.31, re-implemented in `published_ids`). The transformers-5 tokenizer is loaded the way mcomp loads a
real checkpoint folder. Where it differs from the published ids the exact ids of both sides are asserted.
"""

from __future__ import annotations

import io
import itertools
import re
import urllib.error
from types import SimpleNamespace

import pytest

from mcomp.tokenization import tokenize_with_placeholders
from tests import llama_vocab as lv
from tests.modelcompose_reference import (
    published_labels,
    published_modal_tokens,
    published_prompt,
)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
IMAGE_PROMPT = SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT:"
CONVERSATION = SYSTEM + " USER: Hi ASSISTANT: Hello</s>USER: And? ASSISTANT: Yes</s>"
IMAGE_ID = -200


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """Model built once per session; one Vicuna folder per `legacy` value in tokenizer_config.json."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    try:
        vocab, merges, js = lv.load_package()
    except RuntimeError as e:  # a missing download must fail loudly, never skip
        pytest.fail(f"LLaMA vocabulary unavailable: {e}", pytrace=False)
    model = lv.build_sentencepiece_model(vocab, merges)
    root = tmp_path_factory.mktemp("vicuna")
    toks, folders = {}, {}
    for legacy in (False, True):
        folders[legacy] = lv.write_vicuna_tokenizer(root / f"legacy_{legacy}", model, legacy=legacy)
        toks[legacy] = AutoTokenizer.from_pretrained(str(folders[legacy]), trust_remote_code=False)  # as mcomp loads
    return SimpleNamespace(
        vocab=vocab,
        merges=merges,
        js=js,
        sp=spm.SentencePieceProcessor(model_proto=model),
        tok=toks,
        folders=folders,
        cases=lv.js_test_cases(js),
    )


@pytest.mark.parametrize("failure", ["bad bytes", "no network"])
def test_fetch_refuses_bad_download(tmp_path, monkeypatch, failure):
    def urlopen(url, timeout):
        if failure == "no network":
            raise urllib.error.URLError("offline")
        return io.BytesIO(b"not the package")

    monkeypatch.setattr(lv.urllib.request, "urlopen", urlopen)
    want = (
        rf"integrity mismatch for {re.escape(lv.PACKAGE_URL)}: expected {re.escape(lv.PACKAGE_INTEGRITY)}, "
        r"got sha512-\S+"
        if failure == "bad bytes"
        else rf"could not download {re.escape(lv.PACKAGE_URL)}"
    )
    with pytest.raises(RuntimeError, match=want):
        lv.fetch_package(tmp_path)
    assert not list(tmp_path.glob("*.tgz")), "a refused download must not be cached"


def test_vicuna_folder(llama):
    for legacy, tok in llama.tok.items():
        assert type(tok).__name__ == "LlamaTokenizer" and tok.legacy is legacy
        assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", None)
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
        assert (tok.model_max_length, tok.padding_side, len(tok)) == (4096, "right", lv.VOCAB_SIZE)
        some = [3, 13, 259, 29871, 31999]
        assert tok.convert_ids_to_tokens(some) == [llama.vocab[i] for i in some]
        ids = tok(SYSTEM)["input_ids"]
        assert ids[0] == 1 and ids[-1] != 2  # add_bos_token true, add_eos_token false
        assert tok.decode(ids, skip_special_tokens=True) == SYSTEM


def test_js_cases_sentencepiece(llama):
    # The JS prepends BOS and a space, then merges; SentencePiece's dummy prefix is that space.
    assert len(llama.cases) == 12, "the pinned package has 12 testCase calls"
    for text, want in llama.cases:
        assert [1] + llama.sp.encode(text) == want, f"SentencePiece model differs from the JS test case {text!r}"


@pytest.mark.parametrize("legacy", [False, True])
def test_js_cases_transformers5(llama, legacy):
    tok = llama.tok[legacy]
    for text, want in llama.cases:
        got = tok(text)["input_ids"]
        if not text.startswith(" "):
            assert got == want, f"transformers 5 differs from the JS test case {text!r}"
            continue
        # Known difference: transformers 5 builds LlamaTokenizer with a Metaspace pre-tokenizer that adds the
        # "▁" prefix only when the text does not already start with one, whereas SentencePiece (and the published
        # slow tokenizer) always adds it. So " x" loses one leading space: e.g. " grabbed" gives
        # [1, 2646, 1327, 287] instead of [1, 29871, 2646, 1327, 287].
        assert got == [1] + llama.sp.encode(text[1:]) != want, (
            f"{text!r}: transformers 5 gave {got}, JS/SentencePiece {want}"
        )


def merge_rank_bpe(rank: dict, vocab_index: dict, text: str) -> list[int]:
    """tokenizer.json-style BPE (lowest merge rank first, leftmost on ties), as the JS package does it."""
    syms = list(lv.SPACE + text.replace(" ", lv.SPACE))
    while True:
        cands = [(rank[p], i) for i, p in enumerate(itertools.pairwise(syms)) if p in rank]
        if not cands:
            break
        i = min(cands)[1]
        syms[i : i + 2] = [syms[i] + syms[i + 1]]
    # characters outside the vocabulary fall back to their UTF-8 bytes (<0x00> is id 3)
    return [x for s in syms for x in ([vocab_index[s]] if s in vocab_index else [3 + b for b in s.encode()])]


def test_scores_reproduce_merge_priority(llama):
    rank = {}
    for r, (a, b) in enumerate(llama.merges):
        rank.setdefault((llama.vocab[a], llama.vocab[b]), r)
    index = {p: i for i, p in enumerate(llama.vocab)}
    # space runs exercise the 15 whitespace-only pieces whose scores tie (see llama_vocab.piece_scores)
    texts = [" " * n + "x" for n in range(40)] + ["a" + " " * n + "b" for n in range(1, 36)]
    texts += [SYSTEM, "\tfoo  bar   baz\n\n  qux", "ASSISTANT: ", "Ünïcödé 🦙 façade naïve"]
    for text in texts:
        assert llama.sp.encode(text) == merge_rank_bpe(rank, index, text), f"score order != merge order on {text!r}"


def published_with_placeholders(sp, text: str) -> list[int]:
    """The published `tokenizer_modal_token`: chunks tokenised alone, BOS once, placeholder -> negative id."""
    ids = [1]
    for part in re.split("(<image>)", text):
        if part == "<image>":
            ids.append(IMAGE_ID)
        elif part:
            ids += lv.published_ids(sp, part)[1:]
    return ids


@pytest.mark.parametrize("legacy", [False, True])
def test_image_prompt_matches_published(llama, legacy):
    want = published_with_placeholders(llama.sp, IMAGE_PROMPT)
    assert tokenize_with_placeholders(llama.tok[legacy], IMAGE_PROMPT, {"<image>": IMAGE_ID}) == want
    # the chunk after the placeholder restarts with the dummy prefix: "\nWhat" -> "▁", "<0x0A>", "What"
    k = want.index(IMAGE_ID)
    assert want[k + 1 : k + 4] == [29871, 13, 5618]
    # 4.31 with legacy=False gives the same ids here: no special token inside any chunk
    assert lv.published_ids(llama.sp, IMAGE_PROMPT, legacy=False) == lv.published_ids(llama.sp, IMAGE_PROMPT)


@pytest.mark.parametrize("legacy", [False, True])
def test_conversation_after_eos(llama, legacy):
    sp = llama.sp
    published = lv.published_ids(sp, CONVERSATION)  # 4.31, legacy=True
    got = llama.tok[legacy](CONVERSATION)["input_ids"]
    eos = published.index(2)
    # published: each text piece after </s> is encoded alone, with its dummy prefix: "USER" -> "▁US", "ER"
    assert published[eos + 1 : eos + 4] == [3148, 1001, 29901], sp.id_to_piece(published[eos + 1 : eos + 4])
    if legacy:
        assert got == published
    else:
        # transformers 5, legacy=False (prepend_scheme "first"): no "▁" after </s>, so "USER" is one piece
        assert got == published[: eos + 1] + [11889] + published[eos + 3 :], f"transformers 5 gave {got}"
    # transformers 4.31 itself with legacy=False (if Vicuna's config says so) strips the "▁" of the first
    # token instead: "▁US" -> "US", giving a third variant
    assert lv.published_ids(sp, CONVERSATION, legacy=False) == published[: eos + 1] + [3308] + published[eos + 2 :]
    assert sp.id_to_piece([11889, 3308]) == ["USER", "US"]


@pytest.mark.parametrize("legacy", [False, True])
def test_mask_rule_prompts(llama, legacy):
    """Published masking: instruction_len = len(tok(round up to "ASSISTANT: ")) - 2 (BOS and the trailing "▁")."""
    sp, tok = llama.sp, llama.tok[legacy]
    for text in ["ASSISTANT: ", "Hello", "Yes", SYSTEM + " USER: Hi ASSISTANT: ", "USER: And? ASSISTANT: "]:
        assert tok(text)["input_ids"] == lv.published_ids(sp, text), text
    instruction = lv.published_ids(sp, SYSTEM + " USER: Hi ASSISTANT: ")
    assert instruction[-1] == sp.piece_to_id(lv.SPACE)  # the trailing space is an orphan "▁" alone ...
    conv = lv.published_ids(sp, CONVERSATION)
    n = len(instruction) - 2  # ... which, in the whole conversation, is absorbed by "▁Hello"
    assert conv[: n + 1] == instruction[:-1] and conv[n + 1] == lv.published_ids(sp, "Hello")[1]


# --- mcomp's own paths on the real vocabulary --------------------------------------------------------------------


class PublishedTokenizer:
    """The published code's tokenizer as the reference functions call it (`tok(text).input_ids`), with
    the pad id the released training sets (pad = unk)."""

    bos_token_id, pad_token_id = 1, 0

    def __init__(self, sp, legacy: bool):
        self.sp, self.legacy = sp, legacy

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=lv.published_ids(self.sp, text, legacy=self.legacy))


@pytest.fixture(scope="module")
def vicuna_models(llama):
    """A tiny random LLaMA with Vicuna's vocabulary and an image adapter, per `legacy` value."""
    from transformers import AutoTokenizer

    from mcomp.model import MultimodalLM
    from mcomp.tiny import build_llm, tiny_image_adapter_config

    out = {}
    for legacy, folder in llama.folders.items():
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        tok.pad_token = tok.unk_token  # as the released training code sets it
        llm = build_llm(tok, "tiny-llama", num_hidden_layers=1)
        out[legacy] = MultimodalLM.build(llm, tok, [tiny_image_adapter_config()])
    return out


PROMPTS = [
    IMAGE_PROMPT,
    SYSTEM + " USER: <image> and <image>: the same colour? ASSISTANT:",  # chunks that start with a space
    SYSTEM + " USER: image: <image>\naudio:  <image>   What  is\tit? ASSISTANT:",
    CONVERSATION.replace("Hi", "<image> Hi"),  # text after </s>, a placeholder in the first round
]


@pytest.mark.parametrize("legacy", [False, True])
def test_mcomp_prompt_ids_are_the_published_ids(llama, vicuna_models, legacy):
    model, published = vicuna_models[legacy], PublishedTokenizer(llama.sp, legacy)
    tags = model.placeholder_ids
    for prompt in PROMPTS:
        assert model.tokenize(prompt) == published_modal_tokens(prompt, published, tags), prompt
    # transformers 5 on its own gives other ids for a chunk that starts with a space: mcomp does not use it there
    plain = tokenize_with_placeholders(llama.tok[legacy], PROMPTS[1], tags)
    assert plain != published_modal_tokens(PROMPTS[1], published, tags)


CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A red cube."}],
    [
        {"from": "human", "value": "<image> Colour?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the shape?"},
        {"from": "gpt", "value": "A cube,\nsmall."},
    ],
    [{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Which? <image>"}, {"from": "gpt", "value": " B"}],
]


@pytest.mark.parametrize("legacy", [False, True])
def test_mcomp_training_ids_and_labels_are_the_published_ones(llama, vicuna_models, legacy):
    model, published = vicuna_models[legacy], PublishedTokenizer(llama.sp, legacy)
    for conversation in CONVERSATIONS:
        text = published_prompt(conversation)
        ids = published_modal_tokens(text, published, model.placeholder_ids)
        labels = published_labels(text, ids, published, model.placeholder_ids)
        assert any(t >= 0 for t in labels), "the published rule keeps answers to learn"
        assert model.conversation_ids(conversation) == (ids, labels), conversation


def test_a_saved_model_keeps_the_sentencepiece_tokenizer(llama, vicuna_models, tmp_path):
    """transformers 5 saves tokenizer.json only; mcomp also keeps tokenizer.model, so a model read back
    tokenises as the one saved."""
    from transformers import AutoTokenizer

    from mcomp.tokenization import save_tokenizer, slow_llama_encoder

    save_tokenizer(llama.tok[False], tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    again = slow_llama_encoder(AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=False))
    assert again is not None and again.legacy is False
    for prompt in PROMPTS:
        assert again(prompt) == lv.published_ids(llama.sp, prompt, legacy=False)
