"""The embedded default: a tiny model zoo trained on the synthetic world, and the demo."""

from mcomp.zoo.build import Zoo, ZooSettings, build_zoo, default_root

__all__ = ["Zoo", "ZooSettings", "build_zoo", "default_root"]
