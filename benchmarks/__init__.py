"""Benchmarks shipped with mcomp (installed as ``mcomp.benchmarks``)."""
