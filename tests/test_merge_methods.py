"""Merge methods against the independent flattened reference (tests/merge_reference.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import merge_reference as ref  # noqa: E402

from mcomp.merge import make_params, merge_state_dicts, merge_task_vectors  # noqa: E402
from mcomp.merge.selection import RowQuantiles, float_keys, key_to_float  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = {"emb": (97, 32), "q": (32, 32), "norm": (32,), "up": (64, 32), "odd": (7, 5, 3)}


def make_models(n=3, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = []
    for i in range(n):
        # heavy-ish tails and per-tensor scales, like real fine-tuning deltas
        models.append({k: v + scale * (1 + i) * torch.randn(v.shape, generator=g) ** 3 for k, v in base.items()})
    return base, models


def rel_err(out, expect):
    num = max(float((out[k].float() - expect[k].float()).abs().max()) for k in expect)
    den = max(float(expect[k].float().abs().max()) for k in expect)
    return num / den


def deltas_of(base, models):
    return [{k: m[k] - base[k] for k in base} for m in models]


ENGINE_MODES = {
    "in-memory": {},
    "chunked-sample": {"chunk_elems": 300, "inmemory_elems": 0},
    "chunked-histogram": {"chunk_elems": 300, "inmemory_elems": 0, "sample_size": 0},
}


# every variant in memory and streamed with sample brackets; the histogram fallback on a subset
PCB_CASES = [
    (m, s, v) for m in ("in-memory", "chunked-sample") for s in ("global", "tensor") for v in ("v1", "v2", "v3")
]
PCB_CASES += [("chunked-histogram", "global", "v1"), ("chunked-histogram", "tensor", "v3")]
TIES_CASES = [
    (m, s, g) for m in ("in-memory", "chunked-sample") for s in ("global", "tensor") for g in ("mass", "frequency")
]
TIES_CASES += [("chunked-histogram", "global", "mass")]


@pytest.fixture(params=["native", "numpy", "rule"])
def kernels_used(request, monkeypatch):
    """Run with the fused native kernels (when built), with the NumPy chain, and with the method's
    rule alone (no acceleration)."""
    from mcomp.merge import acceleration, native

    if request.param == "native" and not native.available():
        pytest.skip("mcomp.merge._native is not built")
    if request.param == "numpy":
        monkeypatch.setattr(native, "_lib", None)
    if request.param == "rule":
        monkeypatch.setattr(acceleration, "acceleration_of", lambda method: None)
    return request.param


@pytest.mark.parametrize("mode,scope,inter", PCB_CASES)
def test_pcb_matches_reference(mode, scope, inter, kernels_used):
    base, models = make_models()
    w = [1.2, 0.9, 1.1]
    expect = ref.by_scope(base, models, scope, lambda t: ref.pcb(t, 0.15, 0.02, inter, w, 1.3))
    out = merge_state_dicts(
        base, models, "pcb", ratio=0.15, clip=0.02, inter=inter, scope=scope, weights=w, scale=1.3, **ENGINE_MODES[mode]
    )
    assert rel_err(out, expect) < 1e-6
    # the stronger check in delta space (θ0 = 0): nothing hides behind the base's magnitude
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    tvs = deltas_of(base, models)
    expect_d = ref.by_scope(zero, tvs, scope, lambda t: ref.pcb(t, 0.15, 0.02, inter, w, 1.3))
    out_d = merge_task_vectors(
        tvs, "pcb", ratio=0.15, clip=0.02, inter=inter, scope=scope, weights=w, scale=1.3, **ENGINE_MODES[mode]
    )
    assert rel_err(out_d, expect_d) < 1e-6


def test_pcb_variants_differ():
    base, models = make_models()
    outs = [merge_task_vectors(deltas_of(base, models), "pcb", inter=v) for v in ("v1", "v2", "v3")]
    assert rel_err(outs[0], outs[1]) > 1e-3 and rel_err(outs[1], outs[2]) > 1e-3


@pytest.mark.parametrize("mode,scope,sign", TIES_CASES)
def test_ties_matches_reference(mode, scope, sign, kernels_used):
    base, models = make_models(n=4, seed=1)
    w = [1.0, 0.5, 2.0, 1.5]
    tvs = deltas_of(base, models)
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    expect = ref.by_scope(zero, tvs, scope, lambda t: ref.ties(t, 0.3, w, 0.8, sign))
    out = merge_task_vectors(
        tvs, "ties", density=0.3, scope=scope, weights=w, scale=0.8, sign=sign, **ENGINE_MODES[mode]
    )
    assert rel_err(out, expect) < 1e-6
    expect_t = ref.by_scope(base, models, scope, lambda t: ref.ties(t, 0.3, w, 0.8, sign))
    assert (
        rel_err(
            merge_state_dicts(
                base, models, "ties", density=0.3, scope=scope, weights=w, scale=0.8, sign=sign, **ENGINE_MODES[mode]
            ),
            expect_t,
        )
        < 1e-6
    )


def test_ties_density_one_keeps_everything_and_majority_fills_zero_sums():
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -1.0, 2.0, 0.5])}, {"w": torch.tensor([-1.0, -3.0, 2.0, 0.5])}]
    out = merge_state_dicts(base, models, "ties", density=1.0)["w"]
    # coordinate 0 sums to 0 -> majority sign (+): mean of the positive entries = 1
    assert out.tolist() == [1.0, -2.0, 2.0, 0.5]


def test_task_arithmetic_and_linear():
    base, models = make_models()
    w = [0.2, 0.5, 1.5]
    expect = ref.by_scope(base, models, "global", lambda t: ref.task_arithmetic(t, w, 0.7))
    assert rel_err(merge_state_dicts(base, models, "task_arithmetic", weights=w, scale=0.7), expect) < 1e-6
    avg = merge_state_dicts(base, models, "linear")
    for k in base:
        torch.testing.assert_close(avg[k], sum(m[k] for m in models) / 3, rtol=1e-6, atol=1e-6)


def test_dtype_in_float32_math_chosen_dtype_out():
    base, models = make_models()
    half = [{k: v.half() for k, v in m.items()} for m in [base, *models]]
    out = merge_state_dicts(half[0], half[1:], "pcb")
    assert all(v.dtype == torch.float16 for v in out.values())
    expect = ref.by_scope(
        {k: v.float() for k, v in half[0].items()},
        [{k: v.float() for k, v in m.items()} for m in half[1:]],
        "global",
        lambda t: ref.pcb(t),
    )
    assert rel_err(out, {k: v.half() for k, v in expect.items()}) < 1e-3  # fp16 output rounding only
    out32 = merge_state_dicts(half[0], half[1:], "pcb", dtype="float32")
    assert rel_err(out32, expect) < 1e-6


# -- DARE -------------------------------------------------------------------------------------
def test_dare_keeps_expected_fraction_and_preserves_expectation():
    g = torch.Generator().manual_seed(0)
    tv = {"w": torch.randn(200, 500, generator=g), "b": torch.randn(1000, generator=g)}
    out = merge_task_vectors([tv], "dare_linear", density=0.3, seed=7)
    kept = float((out["w"] != 0).float().mean())
    n = tv["w"].numel()
    assert abs(kept - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    nz = out["w"] != 0
    torch.testing.assert_close(out["w"][nz], tv["w"][nz] / 0.3)
    # expectation: average over seeds converges to τ (standard error shrinks as 1/sqrt(seeds))
    small = {"w": torch.randn(400, generator=g)}
    seeds = 200
    mean = sum(merge_task_vectors([small], "dare_linear", density=0.3, seed=s)["w"] for s in range(seeds)) / seeds
    stderr = small["w"].abs() * math.sqrt((1 - 0.3) / 0.3 / seeds)
    assert bool(((mean - small["w"]).abs() <= 5 * stderr + 1e-6).all())


def test_dare_l1_rescale_matches_norm():
    g = torch.Generator().manual_seed(1)
    tv = {"w": torch.randn(100, 100, generator=g)}
    out = merge_task_vectors([tv], "dare_linear", density=0.4, rescale="l1", seed=3)
    torch.testing.assert_close(out["w"].abs().sum(), tv["w"].abs().sum(), rtol=1e-5, atol=0)


def test_dare_seeded_and_chunk_independent():
    base, models = make_models()
    a = merge_state_dicts(base, models, "dare_ties", density=0.4, seed=11)
    b = merge_state_dicts(base, models, "dare_ties", density=0.4, seed=11, chunk_elems=37, inmemory_elems=0)
    c = merge_state_dicts(base, models, "dare_ties", density=0.4, seed=12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_dare_ties_equals_ties_steps_on_dropped_vectors():
    """dare_ties = DARE masks (same seed as dare_linear) then TIES steps 2-4 of the reference."""
    base, models = make_models()
    tvs = deltas_of(base, models)
    dropped = []
    for i in range(3):
        single = merge_task_vectors([tvs[i]], "dare_linear", density=0.5, seed=5)  # masks of model 0
        dropped.append(single)
    # masks depend on (seed, tensor, model index): rebuild with the right model indices
    from mcomp.merge.methods.family import MaskStream

    ms = MaskStream(5, 0.5)
    dropped = [
        {k: tvs[i][k] * ms.mask(k, i, 0, tvs[i][k].numel()).reshape(tvs[i][k].shape) / 0.5 for k in base}
        for i in range(3)
    ]
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    expect = ref.by_scope(zero, dropped, "tensor", lambda t: ref.ties(t, 1.0))
    out = merge_task_vectors(tvs, "dare_ties", density=0.5, seed=5)
    assert rel_err(out, expect) < 1e-6


# -- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,params,name",
    [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("pcb", {"ratio": -0.1}, "ratio"),
        ("pcb", {"clip": 0.5}, "clip"),
        ("pcb", {"inter": "v4"}, "inter"),
        ("pcb", {"scope": "layer"}, "scope"),
        ("dare_linear", {"rescale": "l2"}, "rescale"),
        ("dare_linear", {"seed": -1}, "seed"),
        ("task_arithmetic", {"weights": [1.0]}, "weights"),
        ("task_arithmetic", {"scale": float("nan")}, "scale"),
        ("task_arithmetic", {"ratio": 0.1}, "ratio"),
    ],
)
def test_bad_parameters_name_the_parameter(method, params, name):
    with pytest.raises(ValueError, match=name):
        make_params(method, 2, **params)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_state_dicts({"a": torch.zeros(2)}, [{"a": torch.ones(2)}], "nope")


def test_pcb_zero_range_guard():
    """A task with a constant |τ| row: the reference gives NaN; mcomp gives zero weights for it."""
    base = {"w": torch.zeros(100)}
    models = [{"w": torch.full((100,), 0.5)}, {"w": torch.linspace(-1, 1, 100)}]
    out = merge_state_dicts(base, models, "pcb", ratio=0.5, clip=0.0)["w"]
    assert bool(torch.isfinite(out).all())


# -- selection ------------------------------------------------------------------------------------
def test_float_keys_order_and_roundtrip():
    x = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-45, 2.0, float("inf")])
    k = float_keys(x)
    assert bool((k[1:] >= k[:-1]).all()) and int(k[3]) == int(k[4])
    assert [key_to_float(int(v)) for v in k] == [float(v) + 0.0 for v in x]


@pytest.mark.parametrize("sample,blocks", [(True, False), (False, False), (True, True)])
def test_row_quantiles_exact_with_ties_and_zeros(sample, blocks):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20000, generator=g)
    x[0, :3000] = 0.0
    x[1] = torch.round(x[1] * 4) / 4  # heavy ties
    ranks = [[0, 2999, 3000, 19999], [5, 10000, 19000], [123, 17000]]
    q = RowQuantiles(ranks, x.shape[1])
    if sample:
        q.use_sample(x[:, ::97])
    while q.needs_pass:
        q.begin_pass()
        if blocks and q.blockwise:  # blocks of the chunks out of order, as parallel workers deliver them
            assert q.passes == 1
            for c in reversed(x.split(1234, dim=1)):
                for b in c.split(100, dim=1)[::-1]:
                    q.update_block(b)
        else:
            for c in x.split(1234, dim=1):
                q.update(c)
        q.end_pass()
    if blocks:
        assert q.passes == 1  # the sample brackets held: the blockwise pass found everything
    s = torch.sort(x, dim=1).values
    for i, rs in enumerate(ranks):
        for r in rs:
            assert q.value(i, r) == float(s[i, r])


def test_bracket_scan_counts_and_collects_exactly():
    from mcomp.merge.kernels import bracket_scan

    g = torch.Generator().manual_seed(5)
    row = torch.round(torch.randn(50000, generator=g) * 8) / 8  # ties on both bracket ends
    for lo, hi in [(-0.5, 0.25), (1.0, 1.0), (2.0, 3.5), (-10.0, 10.0)]:
        below, inside = bracket_scan(row, lo, hi)
        assert below == sum(1 for v in row.tolist() if v < lo)
        assert inside.tolist() == [v for v in row.tolist() if lo <= v <= hi]  # stream order kept
