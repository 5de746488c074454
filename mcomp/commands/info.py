"""`mcomp info`: versions, devices, the merge kernels in use and the registered modality adapters."""

from __future__ import annotations

import importlib.metadata
import platform


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show versions, devices and registered modalities")
    p.set_defaults(func=run)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _kernels() -> str:
    """Whether the merge engine runs its fused native kernels (results can differ from the NumPy
    fallback's in the last bits, so a user comparing runs wants to know)."""
    import os

    from mcomp.merge import native
    from mcomp.merge.acceleration import available_accelerations

    if native.available():
        return f"native ({native.library_path()}), accelerating {', '.join(sorted(available_accelerations()))}"
    if os.environ.get("MCOMP_NATIVE", "1") == "0":
        return "NumPy/torch path (MCOMP_NATIVE=0 turns the native kernels off)"
    return "NumPy/torch path (mcomp.merge._native was not built: reinstall with a C compiler)"


def run(args) -> int:
    import torch

    import mcomp
    from mcomp.modality import available_adapters

    print(f"mcomp {mcomp.__version__} (python {platform.python_version()})")
    for dist in (
        "torch",
        "torchaudio",
        "torchvision",
        "transformers",
        "peft",
        "accelerate",
        "open_clip_torch",
        "open3d",
    ):
        print(f"  {dist:16s} {_version(dist)}")
    devices = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    print(f"devices: {', '.join(devices)}")
    print(f"merge kernels: {_kernels()}")
    print("modalities:")
    for name, cls in available_adapters().items():
        print(
            f"  {name:16s} modality={cls.modality:8s} placeholder={cls.placeholder:10s} "
            f"{cls.__module__}.{cls.__qualname__}"
        )
    return 0
