"""MCUB: the multimodal commonality understanding benchmark (installed as ``mcomp.benchmarks.mcub``)."""
