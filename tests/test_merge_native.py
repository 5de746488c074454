"""The fused native kernels (mcomp/merge/_native.c) against the NumPy/torch chain they replace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mcomp.merge import native
from mcomp.merge.methods.pcb import balance, clip, clip_and_normalise, combine, scores_from_beta

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not native.available(), reason="mcomp.merge._native is not built"),
]


def task_vectors(n=3, d=5003, seed=0):
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(n, d, generator=g) ** 3 * 1e-3
    tau[:, :97] = 0.0  # a mass of zeros: ties at the low clip
    lo = [float(tau[i].abs().kthvalue(int(d * 0.02) + 1).values) for i in range(n)]
    hi = [float(tau[i].abs().kthvalue(int(d * 0.98)).values) for i in range(n)]
    hi[-1] = lo[-1]  # a zero range: N = 0 for that row (the documented guard)
    return tau, lo, hi


@pytest.fixture(params=["dispatched", "portable"])
def cpu_paths(request):
    """The kernels as dispatched on this CPU, then on their portable paths (no AVX-512, no F16C)."""
    if request.param == "dispatched":
        yield request.param
        return
    with native.portable_paths():
        yield request.param


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("inter", ["v1", "v2", "v3"])
def test_beta_matches_numpy_chain(inter):
    tau, lo, hi = task_vectors()
    _, norm = clip_and_normalise(tau, lo, hi)
    expect = balance(tau, norm, inter)
    out = native.pcb_beta(tau, lo, hi, inter, torch.empty_like(tau))
    assert rel(out, expect) < 1e-6
    # a block of columns (strided rows) gives the same bits as the whole: no position dependence
    part = native.pcb_beta(tau[:, 1001:3002], lo, hi, inter, torch.empty(tau.shape[0], 2001))
    assert torch.equal(part, out[:, 1001:3002])


@pytest.mark.parametrize("inter", ["v1", "v3"])
@pytest.mark.parametrize("weights,scale", [(None, 1.0), ([1.2, 0.8, 1.1], 1.5)])
def test_merge_matches_numpy_chain(inter, weights, scale):
    tau, lo, hi = task_vectors(seed=1)
    d = tau.shape[1]
    beta = native.pcb_beta(tau, lo, hi, inter, torch.empty_like(tau))
    t = [float(beta[i].kthvalue(int(d * 0.8) + 1).values) for i in range(3)]
    m = [float(beta[i].max()) for i in range(3)]
    stats = {"lo": lo, "hi": hi, "t": t, "m": m}
    # the NumPy chain on the same β, so ties with t_i resolve alike
    expect = combine(torch.sign(tau) * clip(tau, lo, hi), scores_from_beta(beta.clone(), t, m), weights, scale)
    out = torch.empty(d)
    native.pcb_merge(tau, stats, inter, weights, scale, out)
    assert rel(out, expect) < 1e-6
    # candidate bits (d is not a multiple of 8; more set columns than a tile holds)
    marked = np.zeros(d, dtype=bool)
    marked[np.random.default_rng(0).choice(d, 1234, replace=False)] = True
    marked[-1] = True
    sparse = torch.full((d,), 7.0)
    native.pcb_merge(tau, stats, inter, weights, scale, sparse, bits=np.packbits(marked))
    assert torch.equal(sparse[marked], out[marked])  # gathered columns: the same bits
    assert bool((sparse[~marked] == 0.0).all())  # exact zeros elsewhere
    with pytest.raises(ValueError, match="bytes of bits"):
        native.pcb_merge(tau, stats, inter, weights, scale, sparse, bits=np.packbits(marked)[:-1])


def test_bracket_scan_counts_and_collects_like_numpy(cpu_paths):
    row = torch.randn(10007, generator=torch.Generator().manual_seed(2))
    row[::50] = 0.25  # ties on the bracket's low end
    lo, hi = 0.25, 0.31
    below, inside = native.bracket_scan(row, lo, hi)
    assert below == int((row < lo).sum())
    assert torch.equal(torch.from_numpy(inside), row[(row >= lo) & (row <= hi)])
    with pytest.raises(ValueError, match="lo < hi"):
        native.bracket_scan(row, 0.25, 0.25)


def test_candidate_bits_match_numpy_packbits():
    x = torch.randn(3, 1003, generator=torch.Generator().manual_seed(3))
    floors = [1.0, 1.5, 2.0]
    bits, count = native.mark_above(x, floors)
    keep = ((x[0] > 1.0) | (x[1] > 1.5) | (x[2] > 2.0)).numpy()
    assert np.array_equal(bits, np.packbits(keep)) and count == int(keep.sum())


@pytest.mark.parametrize("with_floors", [False, True])
@pytest.mark.parametrize("inter,n", [("v1", 3), ("v1", 32), ("v1", 33), ("v2", 3), ("v3", 3)])
@pytest.mark.parametrize("where", ["near the top", "above every value", "around zero"])
@pytest.mark.parametrize("start", [None, "the maximum", "a lower value"])
def test_stage1_reduces_beta_like_separate_steps(with_floors, inter, n, where, start, cpu_paths):
    """Stage 1's fused pass against β computed everywhere: the counts below, the values inside (in
    column order), the candidate bits, and the maximum, exact where it reaches the row's floor
    (variant 1 computes β only where an estimate leaves a column open; more than 32 tasks, or another
    variant, computes it everywhere). A running maximum handed in (a β of the row seen earlier) lets
    variant 1 decide the columns above the bracket and under it without computing them."""
    tau, lo, hi = task_vectors(n=n, seed=4)
    tau[:, 200:260] *= 1e4  # large products: the vector tanh, not its small-argument shortcut
    beta = native.pcb_beta(tau, lo, hi, inter, torch.empty_like(tau))
    maxima = None
    if start is not None:  # a β of each row, from columns 0-2 (outside the block scanned below)
        maxima = beta[:, :3].amax(dim=1) if start == "a lower value" else beta.amax(dim=1)
    quantiles = {"near the top": (0.85, 0.9), "around zero": (0.3, 0.6)}
    if where in quantiles:  # the low end one of the values: a column tied with it must be computed
        k = [int(q * (beta.shape[1] - 3)) for q in quantiles[where]]
        brackets = [(float(b[3:].kthvalue(k[0]).values), float(b[3:].kthvalue(k[1]).values)) for b in beta]
    else:
        brackets = [(float(b.max()) * 2 + 1.0, float(b.max()) * 4 + 2.0) for b in beta]  # β > 0 somewhere
    if where == "around zero" and inter == "v1":
        assert all(b[0] <= 0.0 for b in brackets)  # a bound of 0 does not rule a column out
    floors = [b[0] - 1e-9 * (i % 2) for i, b in enumerate(brackets)] if with_floors else None
    got = native.pcb_stage1(tau[:, 3:], lo, hi, inter, brackets, floors, maxima)  # strided rows, odd width
    part = beta[:, 3:]
    for i, (blo, bhi) in enumerate(brackets):
        assert got.below[i] == int((part[i] < blo).sum())
        if blo == bhi:  # a point bracket (a row of equal values) only counts
            assert got.inside[i] == int((part[i] == blo).sum())
        else:
            assert torch.equal(torch.from_numpy(got.inside[i]), part[i][(part[i] >= blo) & (part[i] <= bhi)])
        floor = min(blo, floors[i]) if with_floors else blo
        largest = max(float(part[i].max()), float(maxima[i]) if maxima is not None else -math.inf)
        if largest >= floor or inter != "v1" or n > 32:
            assert float(got.maxima[i]) == largest
        else:
            assert float(got.maxima[i]) < floor
    if with_floors:
        bits, marked = native.mark_above(part.contiguous(), floors)
        assert np.array_equal(got.bits, bits) and got.marked == marked
    else:
        assert got.bits is None


def test_stage1_with_a_clip_range_too_small_to_estimate(cpu_paths):
    """A clip range whose reciprocal overflows (under 2^-128) leaves variant 1's estimate aside:
    β is computed everywhere, and the statistics are still exact."""
    tau, lo, hi = task_vectors(seed=6)
    lo[0], hi[0] = 0.0, 1e-39  # subnormal: 1/(hi − lo) is not finite
    beta = native.pcb_beta(tau, lo, hi, "v1", torch.empty_like(tau))
    k = [int(q * beta.shape[1]) for q in (0.85, 0.9)]
    brackets = [(float(b.kthvalue(k[0]).values), float(b.kthvalue(k[1]).values)) for b in beta]
    got = native.pcb_stage1(tau, lo, hi, "v1", brackets, [b[0] for b in brackets])
    for i, (blo, bhi) in enumerate(brackets):
        assert got.below[i] == int((beta[i] < blo).sum())
        assert torch.equal(torch.from_numpy(got.inside[i]), beta[i][(beta[i] >= blo) & (beta[i] <= bhi)])
        assert float(got.maxima[i]) == float(beta[i].max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stored_values_decode_like_the_reader(dtype, cpu_paths):
    """From stored fp16/bf16 values the kernels see τ_i = float(θ_i) − float(θ0): the |τ| brackets
    count and collect what the reader's float32 task vectors give, and NaN/Inf is found."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3001, generator=g).to(dtype)
    models = (base.float() + 0.01 * torch.randn(3, 3001, generator=g)).to(dtype)
    models[:, :50] = base[:50]  # zeros in τ
    stored = native.StoredColumns(base, models)
    tau = native.materialise(stored)
    assert torch.equal(tau, models.float() - base.float())
    mags = tau.abs()
    brackets = [
        [
            (0.0, 0.0),
            (float(r.quantile(0.02)), float(r.quantile(0.03))),
            (float(r.quantile(0.98)), float(r.quantile(0.99))),
        ]
        for r in mags
    ]  # a point bracket first
    below, inside, finite = native.abs_brackets(stored.columns(7, 3001), brackets)
    assert finite
    q = 0
    for i, row in enumerate(brackets):
        for lo, hi in row:
            vals = mags[i, 7:]
            assert below[q] == int((vals < lo).sum())
            if lo == hi:
                assert inside[q] == int((vals == lo).sum()) >= 43  # the zeros: counted, not collected
            else:
                assert torch.equal(torch.from_numpy(inside[q]), vals[(vals >= lo) & (vals <= hi)])
            q += 1
    assert native.all_finite(stored)
    models[1, 2000] = float("inf")
    assert not native.all_finite(stored)
    assert not native.abs_brackets(stored, brackets).finite
    assert native.abs_brackets(stored.columns(2001, 3001), brackets).finite  # the Inf is outside
    base[2500] = float("nan")
    assert not native.abs_brackets(stored.columns(2001, 3001), brackets).finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_stored_bit_pattern_decodes_exactly(dtype):
    """All 65,536 patterns (against a zero base): the kernels' |τ| equals torch's conversion,
    subnormals and infinities included; NaNs are caught by the finite check."""
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    stored = native.StoredColumns(torch.zeros_like(patterns), [patterns])
    expect = patterns.float().abs()
    keep = ~torch.isnan(expect)
    below, inside, finite = native.abs_brackets(stored, [[(0.0, float("inf"))]])
    assert below == [0] and torch.equal(torch.from_numpy(inside[0]), expect[keep])
    assert not native.all_finite(stored) and not finite
    small = native.StoredColumns(torch.zeros(3, dtype=dtype), [patterns[:3]])
    assert native.all_finite(small) and native.abs_brackets(small, [[(0.0, 1.0)]]).finite


FAMILY_CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"weights": [0.3, 1.7, -0.4], "scale": 0.9}),
    ("linear", {"weights": [1.0, 2.0, 0.5]}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "sign": "frequency", "weights": [0.5, 1.5, 1.0], "scale": 1.3}),
    ("ties", {"density": 0.4, "scope": "tensor"}),
    ("ties", {"density": 1.0}),
    ("dare_linear", {"density": 0.6, "seed": 3}),
    ("dare_linear", {"density": 0.6, "rescale": "l1", "weights": [1.0, 0.4, 2.0]}),
    ("dare_ties", {"density": 0.7, "seed": 5, "sign": "frequency"}),
    ("dare_ties", {"density": 0.5, "rescale": "l1", "scope": "global", "scale": 0.7}),
    ("dare_ties", {"density": 1.0}),
]


@pytest.mark.parametrize("method,params", FAMILY_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_family_kernels_give_the_torch_paths_bits(method, params, dtype, tmp_path, monkeypatch):
    """Task arithmetic, linear, TIES and DARE on the fused kernels, streamed in the stored dtype over
    chunks that cut tensors, equal the torch path (the method's rule alone) bit for bit."""
    from safetensors.torch import load_file, save_file

    from mcomp.merge import acceleration, merge_checkpoints

    g = torch.Generator().manual_seed(7)
    shapes = {"a": (70, 301), "b": (1000,), "c": (33, 64)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + 0.02 * torch.randn(v.shape, generator=g) ** 3 for k, v in base.items()} for _ in range(3)]
    models[1]["a"][:, :40] = base["a"][:, :40]  # exact zeros in one task: the elected sign can be 0
    models[2]["a"][:, :20] = base["a"][:, :20]
    paths = []
    for name, sd in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        (tmp_path / name).mkdir()
        save_file({k: v.to(dtype) for k, v in sd.items()}, tmp_path / name / "model.safetensors")
        paths.append(tmp_path / name)

    def merged(tag: str) -> dict:
        out = tmp_path / tag
        merge_checkpoints(paths[0], paths[1:], out, method, chunk_elems=4099, dtype="float32", **params)
        return load_file(out / "model.safetensors")

    fast = merged("fast")
    monkeypatch.setattr(acceleration, "acceleration_of", lambda cls: None)
    rule = merged("rule")
    for k in shapes:
        assert torch.equal(fast[k], rule[k]), (method, params, k, float((fast[k] - rule[k]).abs().max()))


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7, 2**63 - 1])
def test_the_native_generator_draws_torch_rands_bits(seed):
    """DARE's draws: the native mt19937 gives torch.rand's float32 uniforms of a generator seeded the
    same, bit for bit, drawn in pieces of any size (across the 624-word state's refills)."""
    g = torch.Generator().manual_seed(seed)
    stream = native.TorchUniformStream(seed)
    for size in (1, 623, 624, 625, 5000, 100_003):
        assert torch.equal(stream.draw(torch.empty(size)), torch.rand(size, generator=g)), size


@pytest.mark.parametrize("draws", ["native", "torch"])
def test_dare_keep_masks_are_the_draws_compared_as_drawn(monkeypatch, draws):
    """DARE's byte masks (what the kernels take) are [u < density] of the stream's own draws, in
    pieces of any size, from the native generator and from torch's."""
    from mcomp.merge.methods.family import MaskStream

    if draws == "torch":
        monkeypatch.setattr(native, "_lib", None)
    density = 0.37
    masks, keeps = MaskStream(5, density), MaskStream(5, density)
    pos = 0
    for size in (1, 700, 624, 5000):
        expected = masks.mask("w", 1, pos, pos + size)
        got = keeps.keep("w", 1, pos, pos + size, out=torch.empty(size, dtype=torch.uint8))
        assert torch.equal(got.bool(), expected), size
        pos += size
    assert 0.3 < float(got.float().mean()) < 0.45


@pytest.mark.parametrize("shape", [(64, 2048), (300, 17), (1, 1), (5, 4096)])
def test_abs_ranks_are_a_stable_argsorts(shape):
    """DELLA's ranks: where each |x| lands in torch.argsort(stable=True) along the last dimension, with
    ties (equal magnitudes of either sign, +0 and -0) in position order, and magnitudes that differ only
    in the low bits, the middle bits or the top bits (each radix pass, and the skipped ones)."""
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g) * 0.01).half().float() - (
        torch.randn(shape, generator=g) * 0.01
    ).half().float()
    if shape[-1] > 8:
        x[:, 3], x[:, 7], x[:, 8] = -x[:, 5], 0.0, -0.0
        x[0] = torch.randn(shape[-1], generator=g) * torch.logspace(-30, 30, shape[-1])  # every exponent
    want = torch.empty(shape, dtype=torch.int64).scatter_(
        -1, torch.argsort(x.abs(), dim=-1, stable=True), torch.arange(shape[-1]).expand(shape)
    )
    assert torch.equal(native.abs_ranks(x).long(), want)


def test_della_probabilities_take_the_native_ranks_or_the_argsorts(monkeypatch):
    """rank_probabilities along dim 1 of a 3-D tensor: the native ranks give the argsort's numbers."""
    from mcomp.merge.methods.gta import rank_probabilities

    x = torch.randn(4, 33, 5, generator=torch.Generator().manual_seed(1)).half().float()
    fast = rank_probabilities(x, 0.5, 0.2)
    monkeypatch.setattr(native, "_lib", None)
    assert torch.equal(fast, rank_probabilities(x, 0.5, 0.2))


def test_pool_threads_hold_torch_at_one_thread_and_the_pool_at_its_width():
    from mcomp.merge import kernels

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernels.pool_threads():
            assert torch.get_num_threads() == 1 and kernels.parallel_width() == 2
            assert kernels.parallel_map(lambda x: x * x, [1, 2, 3]) == [1, 4, 9] and kernels._pool_size == 2
        assert torch.get_num_threads() == 2 and kernels.parallel_width() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("width", [5003, 4096])
def test_merge_bits_from_stored_float16_gives_the_float32_paths_bits(width):
    """The merge pass over candidate bits gathers stored float16 values: the same bits as the float32
    task vectors' path, with candidates dense, sparse, across tile ends and at the last column."""
    g = torch.Generator().manual_seed(6)
    base = (0.02 * torch.randn(width, generator=g)).half()
    models = (base.float() + 0.003 * torch.randn(3, width, generator=g)).half()
    stored = native.StoredColumns(base, models)
    tau = native.materialise(stored)
    lo = [float(r.abs().kthvalue(int(width * 0.01) + 1).values) for r in tau]
    hi = [float(r.abs().kthvalue(int(width * 0.99)).values) for r in tau]
    beta = native.pcb_beta(tau, lo, hi, "v1", torch.empty_like(tau))
    stats = {
        "lo": lo,
        "hi": hi,
        "t": [float(b.kthvalue(int(width * 0.9) + 1).values) for b in beta],
        "m": [float(b.max()) for b in beta],
    }
    marked = np.random.default_rng(1).random(width) < 0.3
    marked[:300] = True  # a dense run: more than a tile's worth in a row
    marked[1000:1100] = False
    marked[-1] = True
    bits = np.packbits(marked)
    want, got = torch.full((width,), 7.0), torch.full((width,), 7.0)
    native.pcb_merge(tau, stats, "v1", None, 1.0, want, bits=bits)
    native.pcb_merge(stored, stats, "v1", None, 1.0, got, bits=bits)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert bool((got[~torch.from_numpy(marked)] == 0.0).all()) and bool(got[torch.from_numpy(marked)].ne(0).any())
