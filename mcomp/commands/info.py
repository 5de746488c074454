"""`mcomp info`: versions, devices and the registered modality adapters."""

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
    print("modalities:")
    for name, cls in available_adapters().items():
        print(
            f"  {name:16s} modality={cls.modality:8s} placeholder={cls.placeholder:10s} "
            f"{cls.__module__}.{cls.__qualname__}"
        )
    return 0
