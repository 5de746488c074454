"""Build of mcomp's one compiled piece; everything else is in pyproject.toml.

`mcomp.merge._native` holds the merge engine's fused inner loops (see mcomp/merge/_native.c).
It is optional: where it cannot be built (no C compiler, no glibc vector maths), the install
goes on and the engine uses its NumPy path, with the same results to within a few ulp.
"""

import sys

from setuptools import Extension, setup

linux = sys.platform.startswith("linux")
setup(
    ext_modules=[
        Extension(
            "mcomp.merge._native",
            sources=["mcomp/merge/_native.c"],
            # -fno-wrapv undoes Python's default -fwrapv, which keeps GCC from optimising the kernels'
            # index arithmetic (their signed integers never overflow)
            extra_compile_args=[
                "-O3",
                "-fno-wrapv",
                "-fopenmp-simd",
                "-fno-math-errno",
                "-fno-trapping-math",
                "-ffp-contract=off",
            ]
            if linux
            else [],
            libraries=["mvec", "m"] if linux else [],
            optional=True,
        )
    ]
)
