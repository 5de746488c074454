"""The newer merge methods against independent implementations of their released maths
(tests/merge_reference_2025.py), on random state dicts of several shapes: square, wide, tall, a
dimension not divisible by the number of models, 1-D tensors; 2-4 models; a non-zero base. In memory,
streamed from safetensors files in small chunks, and as task vectors."""

from __future__ import annotations

import pytest
import torch

from mcomp.merge import merge_checkpoints, merge_state_dicts, merge_task_vectors
from tests import merge_reference_2025 as ref

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = {"square": (12, 12), "wide": (9, 22), "tall": (23, 7), "odd": (13, 11), "bias": (17,), "scalar": (1,)}
ELEMENTWISE, SVD = 1e-5, 1e-4


def models_of(n: int, seed: int, spread: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    models = [{k: v + spread * torch.randn(v.shape, generator=g) ** 3 for k, v in base.items()} for _ in range(n)]
    return base, models


def check(method, want_fn, tolerance, n, tmp_path=None, **params):
    base, models = models_of(n, seed=n)
    want = want_fn(base, models)
    got = merge_state_dicts(base, models, method, **params)
    assert ref.relative_error(got, want, base) <= tolerance, method
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    if tmp_path is not None:  # streamed from files, in chunks smaller than a tensor
        from safetensors.torch import save_file

        paths = []
        for name, sd in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
            (tmp_path / name).mkdir()
            save_file(sd, tmp_path / name / "model.safetensors")
            paths.append(tmp_path / name)
        merge_checkpoints(paths[0], paths[1:], tmp_path / "out", method, chunk_elems=16, **params)
        from safetensors.torch import load_file

        streamed = load_file(tmp_path / "out" / "model.safetensors")
        assert ref.relative_error(streamed, want, base) <= tolerance, f"{method} streamed"
    return base, models, zero


@pytest.mark.parametrize("n", [2, 3, 4])
def test_tsv_m_is_the_released_computation(n, tmp_path):
    base, models, zero = check("tsv", lambda b, m: ref.tsv(b, m, scale=0.7), SVD, n, tmp_path, scale=0.7)
    deltas = [{k: m[k] - base[k] for k in base} for m in models]
    got = merge_task_vectors(deltas, "tsv", scale=0.7)
    assert ref.relative_error(got, ref.tsv(zero, deltas, scale=0.7), zero) <= SVD


@pytest.mark.parametrize("n", [2, 3, 4])
def test_iso_c_is_the_released_computation(n, tmp_path):
    check("iso_c", lambda b, m: ref.iso_c(b, m, scale=1.3), SVD, n, tmp_path, scale=1.3)


@pytest.mark.parametrize("n,fraction", [(2, 0.8), (3, 0.8), (4, 0.5), (3, 0.95)])
def test_iso_cts_is_the_released_computation(n, fraction, tmp_path):
    check(
        "iso_cts",
        lambda b, m: ref.iso_cts(b, m, fraction, scale=0.9),
        SVD,
        n,
        tmp_path,
        common_space_fraction=fraction,
        scale=0.9,
    )


def test_svd_methods_average_the_keys_given_and_need_no_square():
    base, models = models_of(3, seed=5)
    got = merge_state_dicts(base, models, "iso_c", average_keys="wide|tall")
    for key in ("wide", "tall"):
        want = base[key] + sum(m[key] - base[key] for m in models) / 3
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got["square"], base["square"] + sum(m["square"] - base["square"] for m in models) / 3)


def test_the_lowrank_mode_truncates_and_follows_a_decaying_spectrum():
    """The randomized range finder really truncates (96×80 matrices, r = 26 of 80 for TSV-M) and is seeded;
    on task matrices whose spectrum decays (σ_i = 0.8^i) TSV-M stays within 1e-3 of the exact merge and
    Iso-CTS (whose projected task matrices decay less) within 0.1."""
    g = torch.Generator().manual_seed(0)

    def decaying(rows: int, cols: int) -> torch.Tensor:
        u = torch.linalg.qr(torch.randn(rows, rows, generator=g)).Q
        v = torch.linalg.qr(torch.randn(cols, cols, generator=g)).Q
        k = min(rows, cols)
        return 0.05 * (u[:, :k] * 0.8 ** torch.arange(k)) @ v[:, :k].T

    base = {"w": torch.randn(96, 80, generator=g)}
    models = [{"w": base["w"] + decaying(96, 80)} for _ in range(3)]
    for method, tolerance in (("tsv", 1e-3), ("iso_cts", 0.1)):
        exact = merge_state_dicts(base, models, method)
        fast = merge_state_dicts(base, models, method, svd="lowrank")
        assert torch.equal(fast["w"], merge_state_dicts(base, models, method, svd="lowrank")["w"])  # seeded
        assert not torch.equal(fast["w"], exact["w"])  # it truncates
        assert ref.relative_error(fast, {"w": exact["w"].double()}, base) < tolerance, method


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("multi_task", ["sum", "ties"])
def test_consensus_is_the_released_computation(n, multi_task, tmp_path):
    lambdas = [0.2, 0.4, 0.6, 0.5][:n]
    check(
        "consensus",
        lambda b, m: ref.consensus(b, m, lambdas, 2, multi_task, 0.2, scale=0.6),
        ELEMENTWISE,
        n,
        tmp_path,
        lambdas=lambdas,
        min_agree=2,
        multi_task=multi_task,
        scale=0.6,
    )


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_is_mergekits(n, method, consensus, tmp_path):
    weights = [1.0, 0.5, 2.0, 0.7][:n]

    def want(b, m):
        def sparsify(x, name, i):
            return ref.breadcrumbs_sparsify(x, 0.6, 0.1, rescale=False)

        return ref.gta(b, m, sparsify, consensus, weights, normalize=consensus, scale=0.8)

    params = dict(density=0.6, gamma=0.1, weights=weights, normalize=consensus, scale=0.8)
    check(method, want, ELEMENTWISE, n, tmp_path, **params)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("method,consensus,normalize", [("della", True, True), ("della_linear", False, False)])
def test_della_is_mergekits_with_mcomps_draws(n, method, consensus, normalize, tmp_path):
    weights = [1.0, 0.5, 2.0, 0.7][:n]

    def want(b, m):
        def sparsify(x, name, i):
            return ref.della_sparsify(x, 0.5, 0.2, True, 3, name, i)

        return ref.gta(b, m, sparsify, consensus, weights, normalize=normalize, scale=1.0)

    check(method, want, ELEMENTWISE, n, tmp_path, density=0.5, epsilon=0.2, seed=3, weights=weights)


def test_della_ranks_along_dim_1_in_chunks_of_whole_slices(tmp_path):
    """DELLA ranks |τ| along dim 1, so its chunks hold whole slices along dim 0: a 3-D tensor (its ranks
    run across the middle dimension) and a wide matrix, streamed a slice or two at a time, keep the
    entries the released rule keeps, with the same draws."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(3)
    base = {"conv": torch.randn(6, 5, 4, generator=g), "wide": torch.randn(7, 30, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    paths = []
    for name, sd in [("base", base), ("m0", models[0]), ("m1", models[1])]:
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
        paths.append(tmp_path / name)
    params = dict(density=0.5, epsilon=0.2, seed=4, rescale=False)

    def sparsify(x, name, i):
        return ref.della_sparsify(x, 0.5, 0.2, False, 4, name, i)

    want = ref.gta(base, models, sparsify, consensus=False, weights=None)
    for chunk_elems in (20, 45):  # one slice of the 3-D tensor (20 values) a chunk, or two
        merge_checkpoints(
            paths[0], paths[1:], tmp_path / f"out{chunk_elems}", "della_linear", chunk_elems=chunk_elems, **params
        )
        got = load_file(tmp_path / f"out{chunk_elems}" / "model.safetensors")
        assert ref.relative_error(got, want, base) <= ELEMENTWISE, chunk_elems
        assert all(torch.equal(got[k], merge_state_dicts(base, models, "della_linear", **params)[k]) for k in base)


def test_lambda_is_mergekits_name_for_scale():
    base, models = models_of(2, seed=7)
    a = merge_state_dicts(base, models, "breadcrumbs", density=0.5, **{"lambda": 0.3})
    b = merge_state_dicts(base, models, "breadcrumbs", density=0.5, scale=0.3)
    assert all(torch.equal(a[k], b[k]) for k in base)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_is_mergekits(n, filter_wise, tmp_path):
    check(
        "model_stock",
        lambda b, m: ref.model_stock(b, m, filter_wise),
        ELEMENTWISE,
        n,
        tmp_path,
        filter_wise=filter_wise,
    )


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_is_mergekits(t, tmp_path):
    base, models, _ = check("slerp", lambda b, m: ref.slerp(b, m[0], t), ELEMENTWISE, 1, tmp_path, t=t)
    near = {k: v * 1.0001 for k, v in base.items()}  # nearly parallel: mergekit's linear fallback
    got = merge_state_dicts(base, [near], "slerp", t=t)
    assert ref.relative_error(got, ref.slerp(base, near, t), base) <= ELEMENTWISE


@pytest.mark.parametrize(
    "method,params,message",
    [
        ("slerp", {}, r"takes exactly 1 model"),
        ("model_stock", {"weights": [1, 2]}, r"takes no per-model weights"),
        ("della", {"density": 0.9, "epsilon": 0.2}, r"density \+ epsilon < 1"),
        ("iso_cts", {"common_space_fraction": 1.5}, r"'common_space_fraction'"),
        ("tsv", {"average_keys": "("}, r"'average_keys' must be a regular expression"),
        ("consensus", {"lambdas": [0.1]}, r"'lambdas' must be a number or 2 numbers"),
        ("breadcrumbs", {"lambda": 1, "scale": 2}, r"give 'lambda' or 'scale'"),
    ],
)
def test_bad_parameters_are_refused_by_name(method, params, message):
    base, models = models_of(2, seed=8)
    with pytest.raises(ValueError, match=message):
        merge_state_dicts(base, models, method, **params)


def test_a_tall_mask_needs_strictly_more_than_lambda_times_the_distance():
    """τ = (1, 2): τ_MTL = 3, so task 1 sits exactly at λ = 0.5 (|1| = 0.5·|3 − 1|) and is left out."""
    base = {"w": torch.zeros(2)}
    models = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, 2.0])}]
    got = merge_state_dicts(base, models, "consensus", lambdas=[0.5, 0.4], min_agree=2)["w"]
    assert got.tolist() == [0.0, 0.0]
    got = merge_state_dicts(base, models, "consensus", lambdas=[0.49, 0.4], min_agree=2)["w"]
    assert got.tolist() == [3.0, 3.0]
    want = ref.consensus(base, models, [0.5, 0.4], 2)["w"]
    assert want.tolist() == [0.0, 0.0]


def lora_updates(n: int, seed: int, rank: int = 3):
    """LoRA-like updates B·A of a few shapes (one not divisible by the number of models)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (16, 16), "wide": (10, 24), "tall": (27, 9), "odd": (13, 11)}
    return [
        {k: 0.3 * torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) for k, (o, i) in shapes.items()}
        for _ in range(n)
    ]


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("density", [0.2, 1.0])
def test_knots_ties_is_the_released_computation(n, density, tmp_path):
    updates = lora_updates(n, seed=n)
    want = ref.knots_ties(updates, density, alpha=0.6)
    params = dict(base_method="ties", base_params={"density": density}, scale=0.6)
    got = merge_task_vectors(updates, "knots", **params)
    zero = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in updates[0].items()}
    assert ref.relative_error(got, want, zero) <= SVD
    base = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in updates[0].items()}
    models = [{k: base[k] + u[k] for k in base} for u in updates]
    want = {k: base[k].double() + v for k, v in want.items()}
    assert ref.relative_error(merge_state_dicts(base, models, "knots", **params), want, base) <= SVD


def test_knots_with_task_arithmetic_is_the_sum_and_needs_a_base_method():
    updates = lora_updates(3, seed=9)
    got = merge_task_vectors(updates, "knots", base_method="task_arithmetic")
    for k in updates[0]:  # U·Σ_t R_t = Σ_t ΔW_t: aligning changes nothing for a sum
        torch.testing.assert_close(got[k], sum(u[k] for u in updates), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown merge method 'nope'"):
        merge_task_vectors(updates, "knots", base_method="nope")
    with pytest.raises(ValueError, match=r"give \['scale'\] as knots' own parameters"):
        merge_task_vectors(updates, "knots", base_params={"scale": 2})


def lora_factors(n: int, seed: int, rank: int = 3):
    """Per task {name: (s·B, A)}: the shapes of `lora_updates`, one of rank 0 in the last task (an adapter
    that does not touch it) and two tasks sharing a B (a rank-deficient side-by-side matrix)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (16, 16), "wide": (10, 24), "tall": (5, 9), "odd": (13, 11)}
    tasks = []
    for t in range(n):
        task = {}
        for k, (o, i) in shapes.items():
            r = 0 if (k == "odd" and t == n - 1) else rank
            b = tasks[0][k][0] if (k == "q" and t == 1) else 0.3 * torch.randn(o, r, generator=g)
            task[k] = (b, torch.randn(r, i, generator=g))
        tasks.append(task)
    return tasks


@pytest.mark.parametrize("n", [2, 3, 4])
def test_knots_takes_the_svd_from_lora_factors(n, tmp_path, monkeypatch):
    """LoRA inputs as factors: the SVD of [ΔW_1 | … | ΔW_T] from a QR of the Bs, equal to the released dense
    computation, through `merge_task_vectors` and through peft adapter folders merged onto a checkpoint."""
    from safetensors.torch import save_file

    from mcomp.merge.methods import knots
    from mcomp.merge.sources import LowRank
    from mcomp.peft_format import write_adapter

    factored_svds = []
    real = knots._svd_of_factors
    monkeypatch.setattr(knots, "_svd_of_factors", lambda *a: factored_svds.append(1) or real(*a))

    tasks = lora_factors(n, seed=20 + n)
    dense = [{k: b.double() @ a.double() for k, (b, a) in t.items()} for t in tasks]
    want = ref.knots_ties(dense, 0.3, alpha=0.7)
    params = dict(base_method="ties", base_params={"density": 0.3}, scale=0.7)
    factored = [{k: LowRank(b, a) for k, (b, a) in t.items()} for t in tasks]
    zero = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in dense[0].items()}
    got = merge_task_vectors(factored, "knots", **params)
    assert ref.relative_error(got, want, zero) <= SVD and len(factored_svds) == 4
    flat = merge_task_vectors([{k: v.float() for k, v in d.items()} for d in dense], "knots", **params)
    assert ref.relative_error(flat, want, zero) <= SVD
    assert ref.relative_error(merge_task_vectors(factored, "knots", factors=False, **params), want, zero) <= SVD
    assert len(factored_svds) == 4  # the dense tensors and `factors: false` took the dense SVD

    # peft folders: ΔW = (α/r)·B·A; a module an adapter lacks has ΔW = 0 for it
    base = {
        f"model.{k}.weight": torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) for k, v in zero.items()
    }
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    for t, task in enumerate(tasks):
        pairs = {f"model.{k}": (a, b / 2.0) for k, (b, a) in task.items() if a.shape[0]}
        config = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": sorted(task)}
        write_adapter(tmp_path / f"a{t}", pairs, config=config)
    merge_checkpoints(tmp_path / "base", [tmp_path / f"a{t}" for t in range(n)], tmp_path / "out", "knots", **params)
    assert len(factored_svds) == 8
    from mcomp.merge.lora import load_lora, merge_lora_adapters

    adapters = [load_lora(tmp_path / f"a{t}") for t in range(n)]
    merged = merge_lora_adapters(adapters, "knots", **params)
    assert ref.relative_error({k: merged[f"model.{k}.weight"] for k in zero}, want, zero) <= SVD
    assert len(factored_svds) == 12
    from safetensors.torch import load_file

    out = load_file(tmp_path / "out" / "model.safetensors")
    got = {k: out[f"model.{k}.weight"] for k in zero}
    theta0 = {k: base[f"model.{k}.weight"].double() for k in zero}
    assert ref.relative_error(got, {k: theta0[k] + v for k, v in want.items()}, theta0) <= SVD


def test_the_merge_yaml_runs_the_new_methods(tmp_path):
    """`mcomp merge` with mergekit's names: lambda, per-model weight, a nested base_params mapping."""
    import yaml
    from safetensors.torch import load_file, save_file

    from mcomp.cli import main

    base, models = models_of(3, seed=11)
    for name, sd in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        (tmp_path / name).mkdir()
        save_file(sd, tmp_path / name / "model.safetensors")
    cases = {
        "della": ({"density": 0.5, "epsilon": 0.1, "lambda": 0.8}, [1.0, 0.5, 2.0]),
        # the streamed Breadcrumbs against mergekit's reading (its own torch calls on whole tensors)
        "breadcrumbs_ties": ({"density": 0.4, "gamma": 0.05, "lambda": 0.8}, [1.0, 0.5, 2.0]),
        "model_stock": ({}, None),
        "iso_cts": ({"common_space_fraction": 0.5, "lambda": 1.2}, None),
        "knots": ({"base_method": "ties", "base_params": {"density": 0.5}, "lambda": 0.6}, None),
    }
    for method, (parameters, weights) in cases.items():
        config = {
            "merge_method": method,
            "base_model": str(tmp_path / "base"),
            "models": [
                {"model": str(tmp_path / f"m{i}"), **({"parameters": {"weight": weights[i]}} if weights else {})}
                for i in range(3)
            ],
            "parameters": parameters,
        }
        (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump(config))
        assert main(["merge", str(tmp_path / f"{method}.yaml"), "--out", str(tmp_path / f"out-{method}")]) == 0
        got = load_file(tmp_path / f"out-{method}" / "model.safetensors")
        params = {("scale" if k == "lambda" else k): v for k, v in parameters.items()}
        want = merge_state_dicts(base, models, method, **params, **({"weights": weights} if weights else {}))
        if method in ("della", "model_stock"):  # mcomp streams its norms in float64, mergekit's reading sums
            # whole tensors in float32
            assert all(torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-6) for k in base), method
        else:
            assert all(torch.equal(got[k], want[k]) for k in base), method


@pytest.mark.parametrize("chunk_elems", [37, 1000])
def test_breadcrumbs_keeps_a_stable_sorts_band_when_streamed(chunk_elems, tmp_path):
    """Breadcrumbs keeps a band of ranks of |τ|; equal magnitudes (common in fp16 deltas) rank by position,
    also when the equal entries straddle chunks (37 elements a chunk, with the sample's brackets) and
    when the band's bounds are equal."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    magnitudes = torch.randint(0, 6, (20, 15), generator=g).float() * 0.25
    tau = magnitudes * torch.where(torch.rand(20, 15, generator=g) < 0.5, -1.0, 1.0)
    base = {"w": torch.zeros(20, 15)}
    (tmp_path / "base").mkdir()
    (tmp_path / "m").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    save_file({"w": tau}, tmp_path / "m" / "model.safetensors")
    order = torch.sort(magnitudes.reshape(-1), stable=True).indices
    # (density, gamma) -> kept band [120, 270), [0, 270), nothing, [147, 150), [0, 285) (the outlier cut shrunk)
    for density, gamma, band in [
        (0.5, 0.1, (120, 270)),
        (0.9, 0.1, (0, 270)),
        (0.003, 0.0, (300, 300)),
        (0.01, 0.5, (147, 150)),
        (0.95, 0.1, (0, 285)),
    ]:
        keep = torch.zeros(300)
        keep[order[band[0] : band[1]]] = 1
        out = tmp_path / f"out-{density}-{gamma}"
        merge_checkpoints(
            tmp_path / "base",
            [tmp_path / "m"],
            out,
            "breadcrumbs",
            chunk_elems=chunk_elems,
            density=density,
            gamma=gamma,
        )
        assert torch.equal(load_file(out / "model.safetensors")["w"].reshape(-1), tau.reshape(-1) * keep), band
        want = ref.breadcrumbs_sparsify(tau.double(), density, gamma, rescale=True)
        rescaled = merge_state_dicts(base, [{"w": tau}], "breadcrumbs", density=density, gamma=gamma, rescale=True)
        torch.testing.assert_close(rescaled["w"].double(), want, rtol=1e-6, atol=1e-6)
        merge_checkpoints(
            tmp_path / "base", [tmp_path / "m"], out, "breadcrumbs", chunk_elems=chunk_elems, force=True,
            density=density, gamma=gamma, rescale=True,
        )  # fmt: skip
        streamed = load_file(out / "model.safetensors")["w"].double()
        torch.testing.assert_close(streamed, want, rtol=1e-6, atol=1e-6)


def test_an_svd_that_does_not_converge_in_float32_is_retried_in_float64(monkeypatch):
    """LAPACK's float32 divide-and-conquer can fail on matrices with many equal singular values (Iso-CTS's
    projected task matrices at 1B did); the merge then takes the float64 decomposition."""
    base, models = models_of(3, seed=12)
    want = merge_state_dicts(base, models, "iso_cts")
    real = torch.linalg.svd
    failed = []

    def flaky(x, *args, **kwargs):
        if x.dtype == torch.float32 and not failed:
            failed.append(tuple(x.shape))
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    got = merge_state_dicts(base, models, "iso_cts")
    assert failed and ref.relative_error(got, {k: v.double() for k, v in want.items()}, base) <= SVD
