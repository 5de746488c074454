"""Option scoring with the context computed once (KV cache) equals `MultimodalLM.loglikelihood`."""

from __future__ import annotations

import pytest

from mcomp.benchmarks.mcub.data import read_questions
from mcomp.benchmarks.mcub.features import EvalFeatureCache
from mcomp.benchmarks.mcub.loglik import score_options, score_options_full
from mcomp.benchmarks.mcub.prompting import build_prompt
from mcomp.benchmarks.mcub.synthetic import write_benchmark
from mcomp.commands.eval import build_tiny_model
from mcomp.conversation import get_template

ORDER = ("image", "audio", "video", "point")
OPTIONS = ["A", "B", "C", "D", "a grand piano", "a violin", "x", "the motorcycle"]  # 1 to 6 tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    m = build_tiny_model("tiny:image,audio,video,point", seed=0)
    m.feature_cache = EvalFeatureCache()  # encoders run once per file in this module
    return m


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = write_benchmark(tmp_path_factory.mktemp("bench"), n=2, per_modality=1)
    return read_questions(root / "data/test/MCUB-4.json", "MCUB-4", root)[0]


def _check_equal(a, b):
    assert [r.num_tokens for r in a] == [r.num_tokens for r in b]
    assert [r.is_greedy for r in a] == [r.is_greedy for r in b]
    for x, y in zip(a, b):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4, rel=1e-5)


def test_prompt_is_the_published_template(model, sample):
    prompt, media, ignored = build_prompt(model, get_template("vicuna_v1"), sample, ORDER)
    assert prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: " + sample.question + " ASSISTANT:"
    )
    assert list(media) == ["vision", "audio", "video", "point"] and not ignored


def test_missing_placeholders_get_demo_lines_in_modality_order_with_prefix(model, sample):
    import dataclasses

    bare = dataclasses.replace(
        sample,
        question="What do they share?",
        turns=(),
        media={"point": sample.media["point"], "vision": sample.media["vision"]},
    )
    prompt, media, ignored = build_prompt(model, get_template("vicuna_v1"), bare, ORDER, "prefix")
    assert prompt == get_template("vicuna_v1").prompt("image: <image>\npoint: <point>\nWhat do they share?")
    assert list(media) == ["vision", "point"] and not ignored
    assert build_prompt(model, get_template("vicuna_v1"), sample, ORDER, "prefix")[0] == get_template(
        "vicuna_v1"
    ).prompt(sample.question)  # placeholders present: verbatim


def test_cached_scores_equal_model_loglikelihood(model, sample):
    prompt, media, _ = build_prompt(model, get_template("vicuna_v1"), sample, ORDER)
    reference = model.loglikelihood(prompt, OPTIONS, media, reuse_context=False)
    assert len({r.num_tokens for r in reference}) > 2  # options of several lengths (right padding is exercised)
    for batch_size in (1, 3, 16):
        _check_equal(score_options(model, prompt, OPTIONS, media, batch_size=batch_size), reference)
    _check_equal(score_options_full(model, prompt, OPTIONS, media), reference)


def test_context_runs_once_and_features_are_encoded_once(model, sample, monkeypatch):
    prompt, media, _ = build_prompt(model, get_template("vicuna_v1"), sample, ORDER)
    lengths = []
    real_forward = model.llm.forward

    def spy(*args, **kwargs):
        lengths.append(kwargs["inputs_embeds"].shape[:2])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model.llm, "forward", spy)
    previous, model.feature_cache = model.feature_cache, EvalFeatureCache()
    cache = model.feature_cache
    try:
        first = score_options(model, prompt, OPTIONS, media, batch_size=4)
        again = score_options(model, prompt, OPTIONS, media, batch_size=4)
    finally:
        model.feature_cache = previous
    ctx_len = lengths[0][1]
    assert lengths[0] == (1, ctx_len) and ctx_len > 100  # the context: once per call, batch of one
    assert all(b == 4 and t < 10 for b, t in lengths[1:3])  # then only the option tokens, two batches of 4
    assert len(lengths) == 6
    assert cache.encoded == 4 and cache.memory_hits == 4  # four files encoded once, reused by the second call
    _check_equal(first, again)  # the cached keys/values were not modified by scoring


def test_routed_lora_model(sample):
    """Options are text: scored with the text route, as in `loglikelihood`, while media positions use theirs."""
    m = build_tiny_model("tiny:image,audio,video,point", seed=1)
    if not hasattr(m, "set_routes"):
        pytest.skip("this MultimodalLM has no routed LoRA")
    m.feature_cache = EvalFeatureCache()
    m.add_lora(r=4, alpha=8, seed=3, zero_b=False)
    m.add_lora(r=4, alpha=8, name="image", seed=4, zero_b=False)
    m.set_routes({"text": [("text", 1.0)], "image": [("image", 1.0)]})
    prompt, media, _ = build_prompt(m, get_template("vicuna_v1"), sample, ORDER)
    reference = m.loglikelihood(prompt, OPTIONS, media, reuse_context=False)
    _check_equal(score_options(m, prompt, OPTIONS, media, batch_size=3), reference)
    m.set_routes({"text": [("text", 1.0)], "image": [("text", 1.0)]})  # the image route matters
    assert m.loglikelihood(prompt, OPTIONS[:1], media)[0].logprob != pytest.approx(reference[0].logprob, abs=1e-6)


def test_batched_contexts_equal_one_at_a_time(tmp_path_factory):
    """Contexts of different lengths (four, three or no inputs) left-padded into one forward: every
    option scores as when its context runs alone, on a routed model (padding shifts the routes)."""
    from mcomp.model import LoglikelihoodRequest

    m = build_tiny_model("tiny:image,audio,video,point", seed=2)
    m.feature_cache = EvalFeatureCache()
    m.add_lora(r=4, alpha=8, seed=5, zero_b=False)
    m.add_lora(r=4, alpha=8, name="video", seed=6, zero_b=False)
    m.set_routes({"text": [("text", 1.0)], "video": [("video", 1.0)]})
    root = write_benchmark(tmp_path_factory.mktemp("batch"), n=2, per_modality=2, seed=3)
    samples = read_questions(root / "data/test/MCUB-4.json", "MCUB-4", root) + read_questions(
        root / "data/test/MCUB-3-audio-video-pointcloud.json", "MCUB-3", root
    )
    template = get_template("vicuna_v1")
    prompts = [build_prompt(m, template, s, ORDER) for s in samples]
    requests = [LoglikelihoodRequest(p.text, OPTIONS[k : k + 3 + k], p.media) for k, p in enumerate(prompts)]
    requests.append(LoglikelihoodRequest(template.prompt("Which is red?"), OPTIONS[2:6], None))
    lengths = {
        len(m.tokenize(r.context)) + sum(m.inserted_tokens(m.modality_of(k)) for k in (r.media or {})) for r in requests
    }
    assert len(lengths) >= 3  # the contexts really are of different lengths
    batched = m.loglikelihood_batch(requests, batch_size=5)
    assert len(batched) == len(requests)
    for request, got in zip(requests, batched):
        _check_equal(got, m.loglikelihood(request.context, request.continuations, request.media, reuse_context=False))


def test_batch_without_a_selectable_cache_scores_each_context_in_full(model, sample, monkeypatch):
    """An LLM that returns no transformers Cache: the options are scored by full forwards instead."""
    from mcomp.model import LoglikelihoodRequest

    prompt, media, _ = build_prompt(model, get_template("vicuna_v1"), sample, ORDER)
    reference = model.loglikelihood(prompt, OPTIONS, media, reuse_context=False)
    real_forward = model.llm.forward

    def no_cache(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.past_key_values = None
        return out

    monkeypatch.setattr(model.llm, "forward", no_cache)
    got = model.loglikelihood_batch(
        [LoglikelihoodRequest(prompt, OPTIONS, media), LoglikelihoodRequest(prompt, OPTIONS[:2], media)]
    )
    _check_equal(got[0], reference)
    _check_equal(got[1], reference[:2])
