"""One suite over every registered modality adapter and every registered merge method (peft's
common-tester pattern): what any unit must do, checked on each, so a new one is tested by being
registered. A built-in unit without a tiny configuration here fails the coverage test."""

from __future__ import annotations

import pytest
import torch

from mcomp.merge import available_methods, merge_checkpoints, merge_state_dicts, merge_task_vectors
from mcomp.merge.acceleration import acceleration_of
from mcomp.modality import available_adapters, build_adapter
from tests.adapter_fixtures import tiny_adapter_config, write_good_files

# one well-formed file per adapter (its modality's format)
GOOD = {
    "image": ".png",
    "video": ".mp4",
    "video_languagebind": ".mp4",
    "audio": ".wav",
    "audio-whisper": ".wav",
    "point": ".npy",
    "llava_onevision_image": ".jpg",
    "llava_onevision_video": ".mp4",
}
BUILT_IN_ADAPTERS = sorted(n for n, c in available_adapters().items() if c.__module__.startswith("mcomp."))
METHODS = sorted(available_methods())
ACCELERATED = sorted(n for n, cls in available_methods().items() if acceleration_of(cls) is not None)


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    return write_good_files(tmp_path_factory.mktemp("contract-media"))


def test_every_built_in_adapter_has_a_tiny_config():
    assert BUILT_IN_ADAPTERS and set(BUILT_IN_ADAPTERS) == set(GOOD)
    for name in BUILT_IN_ADAPTERS:
        assert tiny_adapter_config(name)["adapter"] == name


@pytest.mark.parametrize("name", BUILT_IN_ADAPTERS)
def test_adapter_contract(name, good_files):
    """Config round trip; a decoded file preprocesses to a tensor the adapter recognises and passes
    through; features of encoder_dim project to `tokens_for` rows of the LLM width; the same seed
    builds the same adapter (same fingerprint, same features); a changed weight changes the fingerprint."""
    hidden = 48
    torch.manual_seed(0)
    adapter = build_adapter(tiny_adapter_config(name), hidden).eval()
    cls = type(adapter)
    assert cls.config_class.from_dict(adapter.config.to_dict()) == adapter.config
    tensor = adapter.input_tensor(str(good_files[GOOD[name]]))
    assert adapter._is_preprocessed(tensor) and adapter.input_tensor(tensor) is tensor
    (features,) = adapter.encode_tensors([tensor])
    assert features.dim() == 2 and features.shape[1] == adapter.encoder_dim  # rows: the encoder's tokens
    (projected,) = adapter.project_features([features])
    assert tuple(projected.shape) == (adapter.tokens_for(features), hidden) and torch.isfinite(projected).all()
    torch.manual_seed(0)
    again = build_adapter(tiny_adapter_config(name), hidden).eval()
    assert again.fingerprint() == adapter.fingerprint()
    torch.testing.assert_close(again.encode_tensors([tensor])[0], features, rtol=0, atol=0)
    with torch.no_grad():
        next(again.encoder.parameters()).add_(1.0)
    again.forget_fingerprint()
    assert again.fingerprint() != adapter.fingerprint()


def _models(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 40, generator=g), "b": torch.randn(40, generator=g), "step": torch.tensor(7)}
    models = [
        {
            k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in base.items()
        }
        for _ in range(n)
    ]
    return base, models


@pytest.mark.parametrize("method", METHODS)
def test_merge_method_contract(method):
    """Default parameters work; copies of the base merge to the base; keys, shapes and dtypes are
    kept and non-float tensors come from the base; streaming in small chunks gives the in-memory
    result; the same seed gives the same bytes; task vectors in give the same merged delta (methods
    defined on task vectors: not SLERP, which interpolates the weights themselves)."""
    cls = available_methods()[method]
    base, models = _models(cls.model_count or 3)
    merged = merge_state_dicts(base, models, method)
    assert set(merged) == set(base)
    for k, v in base.items():
        assert merged[k].shape == v.shape and merged[k].dtype == v.dtype
    assert torch.equal(merged["step"], base["step"])
    assert all(torch.isfinite(merged[k]).all() for k in ("w", "b"))
    unchanged = merge_state_dicts(base, [dict(base) for _ in models], method)
    for k in base:
        torch.testing.assert_close(unchanged[k], base[k], rtol=0, atol=0)
    streamed = merge_state_dicts(base, models, method, chunk_elems=7, inmemory_elems=0)
    for k in base:
        torch.testing.assert_close(streamed[k], merged[k], rtol=1e-6, atol=1e-7, msg=f"{method} {k}")
    again = merge_state_dicts(base, models, method)
    assert all(torch.equal(again[k], merged[k]) for k in base)
    if cls.uses_base:
        return
    deltas = [{k: m[k] - base[k] for k in ("w", "b")} for m in models]
    delta = merge_task_vectors(deltas, method)
    for k in ("w", "b"):
        torch.testing.assert_close(base[k] + delta[k], merged[k], rtol=1e-6, atol=1e-6, msg=f"{method} {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ACCELERATED)
def test_acceleration_gives_its_methods_result(method, dtype, tmp_path, monkeypatch):
    """An acceleration is its method's rule computed faster: the same merge, to float rounding, in
    memory and streamed from checkpoints on disk in their stored dtype, as the rule alone gives."""
    from safetensors.torch import load_file, save_file

    from mcomp.merge import acceleration

    base, models = _models(seed=1)
    base["w"] = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    for i, m in enumerate(models):
        m["w"] = base["w"] + 0.05 * (i + 1) * torch.randn(64, 300, generator=torch.Generator().manual_seed(3 + i)) ** 3
    paths = []
    for name, sd in [("base", base)] + [(f"m{i}", m) for i, m in enumerate(models)]:
        (tmp_path / name).mkdir()
        save_file(
            {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()},
            tmp_path / name / "model.safetensors",
        )
        paths.append(tmp_path / name)

    def both() -> tuple[dict, dict]:
        memory = merge_state_dicts(base, models, method)
        out = tmp_path / f"streamed-{len(list(tmp_path.iterdir()))}"
        merge_checkpoints(paths[0], paths[1:], out, method, chunk_elems=2000, dtype="float32")
        return memory, {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}

    fast = both()
    monkeypatch.setattr(acceleration, "acceleration_of", lambda cls: None)
    rule = both()
    for got, want in zip(fast, rule):
        for k in ("w", "b"):
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=f"{method} {k}")
        assert torch.equal(got["step"], want["step"])


METHOD_FILE = '''
"""One file, one merge method: per coordinate, the weighted task-vector entry of largest |value|."""
from dataclasses import dataclass

from mcomp.merge import MergeMethod, MethodParams, register


@dataclass
class MaxMagnitudeParams(MethodParams):
    pass


@register
class MaxMagnitude(MergeMethod):
    name = "max_magnitude_contract"
    Params = MaxMagnitudeParams

    def merge(self, tau, chunk, stats):
        w = self.weights_column(tau)
        t = tau if w is None else tau * w
        return t.gather(0, t.abs().argmax(dim=0, keepdim=True)).squeeze(0) * self.p.scale
'''


def test_a_new_merge_method_is_one_file(tmp_path):
    """The walk-through of docs/adding_a_merge_method.md: one module registers the method, which then
    meets the contract above and merges by its own rule."""
    import importlib.util

    from mcomp.merge import registry

    path = tmp_path / "max_magnitude_contract.py"
    path.write_text(METHOD_FILE)
    spec = importlib.util.spec_from_file_location("max_magnitude_contract", path)
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        assert "max_magnitude_contract" in available_methods()
        test_merge_method_contract("max_magnitude_contract")
        base, models = _models()
        merged = merge_state_dicts(base, models, "max_magnitude_contract")
        tau = torch.stack([m["w"] - base["w"] for m in models])
        want = tau.gather(0, tau.abs().argmax(dim=0, keepdim=True)).squeeze(0)
        torch.testing.assert_close(merged["w"], base["w"] + want)
    finally:
        registry.REGISTRY.remove("max_magnitude_contract")
