"""Routed LoRA at inference: small layers run each route through a dense weight, which must give
the low-rank path's numbers and follow every change of the weights it was made from."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mcomp import lora
from mcomp.commands.eval import build_tiny_model
from mcomp.lora import routed_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    m = build_tiny_model("tiny:image", seed=0)
    m.add_lora(r=4, alpha=8, seed=1, zero_b=False)
    m.add_lora(r=4, alpha=8, name="image", seed=2, zero_b=False)
    m.add_lora(r=4, alpha=8, name="other", seed=3, zero_b=False)
    m.set_routes({"text": [("text", 0.6), ("other", 0.4)], "image": [("image", 1.0)]})
    return m


def _inputs(model):
    torch.manual_seed(0)
    pixels = torch.rand(3, 32, 32)
    return model.prepare_inputs(
        [model.template.prompt("image: <image>\nWhat colour is it?"), model.template.prompt("What shape?")],
        [{"image": pixels}, None],
    )


def _low_rank(model, inputs):
    with torch.enable_grad():  # training-time path: base matmul plus the adapters' low-rank matmuls
        return model(inputs).logits.detach()


def test_dense_routes_equal_the_low_rank_path(model, monkeypatch):
    inputs = _inputs(model)
    assert len(set(inputs.modality_ids.flatten().tolist())) == 2  # text and image tokens: two groups
    expected = _low_rank(model, inputs)
    with torch.no_grad():
        dense = model(inputs).logits
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)
    layer = next(iter(routed_layers(model.llm).values()))
    assert len(layer._dense) == 2  # a dense weight per route the tokens took
    monkeypatch.setattr(lora, "DENSE_ROUTES_MAX_WEIGHTS", 0)  # large layers: the low-rank path
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_dense_weights_follow_weight_changes(model):
    inputs = _inputs(model)
    with torch.no_grad():
        before = model(inputs).logits
    for layer in routed_layers(model.llm).values():  # an optimizer step: in place
        with torch.no_grad():
            layer.lora_B["image"].add_(0.05)
    with torch.no_grad():
        after = model(inputs).logits
    assert not torch.allclose(after, before, atol=1e-3)
    torch.testing.assert_close(after, _low_rank(model, inputs), atol=1e-5, rtol=1e-5)
    model.set_routes({"text": [("text", 1.0)], "image": [("image", 1.0)]})  # new coefficients
    with torch.no_grad():
        rerouted = model(inputs).logits
    torch.testing.assert_close(rerouted, _low_rank(model, inputs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rerouted, after, atol=1e-3)


def test_dense_weights_follow_a_change_of_dtype():
    m = build_tiny_model("tiny:image", seed=4)
    m.add_lora(r=4, alpha=8, seed=5, zero_b=False)
    m.add_lora(r=4, alpha=8, name="image", seed=6, zero_b=False)
    m.set_routes({"text": [("text", 1.0)], "image": [("image", 1.0)]})
    inputs = _inputs(m)
    with torch.no_grad():
        m(inputs)  # dense weights made in float32
    m.double()  # parameters keep their identity; their storage changes
    inputs = dataclasses.replace(inputs, inputs_embeds=inputs.inputs_embeds.double())
    with torch.no_grad():
        dense = m(inputs).logits
    assert dense.dtype == torch.float64
    torch.testing.assert_close(dense, _low_rank(m, inputs), atol=1e-6, rtol=1e-6)  # deltas formed in float32


def test_the_routed_training_path_gives_each_tokens_own_route_and_gradients():
    """Training: every token gets its own route's adapters' update (one matmul pair over all tokens with
    the other routes' rank columns zeroed), with the gradients of a token-by-token computation."""
    from mcomp.lora import RoutedLinear, RoutingState

    g = torch.Generator().manual_seed(0)
    state = RoutingState()
    layer = RoutedLinear(torch.nn.Linear(12, 10), state)
    for name, r in (("text", 3), ("image", 2), ("extra", 4)):
        layer.add_adapter(name, r=r, alpha=2.0 * r, zero_b=False, generator=g)
    state.set_routes({"text": [("text", 1.0)], "image": [("image", 0.7), ("extra", 0.5)], "audio": []})
    state.route_names = ["text", "image", "audio"]
    state.route_ids = torch.tensor([[0, 1, 1, 0, 2, 1], [2, 0, 0, 1, 0, 0]])
    x = torch.randn(2, 6, 12, generator=g, requires_grad=True)
    layer.train()
    got = layer(x)
    weights = torch.randn(got.shape, generator=g)
    (got * weights).sum().backward()
    grads = {
        "x": x.grad.clone(),
        **{f"{k}.{n}": p.grad.clone() for k in ("lora_A", "lora_B") for n, p in getattr(layer, k).items()},
    }

    layer.zero_grad()
    x.grad = None
    rows = []
    for b in range(2):
        for t in range(6):
            xt = x[b, t]
            yt = layer.base_layer(xt)
            for name, coef in state.terms(state.route_names[int(state.route_ids[b, t])]):
                yt = yt + coef * layer.scaling[name] * (layer.lora_B[name] @ (layer.lora_A[name] @ xt))
            rows.append(yt)
    want = torch.stack(rows).view_as(got)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads["x"], x.grad, rtol=1e-5, atol=1e-6)
    for k in ("lora_A", "lora_B"):
        for n, p in getattr(layer, k).items():
            torch.testing.assert_close(grads[f"{k}.{n}"], p.grad, rtol=1e-5, atol=1e-6, msg=f"{k}.{n}")
