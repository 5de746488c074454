"""ctypes bindings of the merge engine's fused inner loops (`mcomp/merge/_native.c`).

Why native code: PCB's per-coordinate maths is a chain of about twenty element-wise steps;
NumPy runs each over the whole block, so the chain is bound by memory traffic and per-call
overhead. Fused, each value is loaded once, and the kernels can decode the stored fp16/bf16
values as they load them, so no float32 copy of a chunk is made (`StoredColumns`). torch.compile
was slower than NumPy on this chain, and numba would add a dependency whose loops call scalar
libm (figures: docs/benchmarks.md).

The extension is optional (see setup.py): `available()` is False where it was not built, or
when the environment sets MCOMP_NATIVE=0, and callers then use their NumPy path. Arguments
are CPU tensors whose rows are contiguous (float32 task vectors, or `StoredColumns`); ctypes
releases the GIL during each call, so the engine's worker threads run them in parallel.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

_VARIANTS = {"v1": 1, "v2": 2, "v3": 3}
_P = ctypes.c_void_p
_L = ctypes.c_long
_local = threading.local()  # .collect: this thread's buffer for the values a bracket collects


def _load() -> ctypes.CDLL | None:
    if os.environ.get("MCOMP_NATIVE", "1") == "0":
        return None
    try:
        spec = importlib.util.find_spec("mcomp.merge._native")
    except ImportError:
        spec = None
    if spec is None or not spec.origin:
        logger.debug("mcomp.merge._native is not built: the merge engine uses its NumPy path")
        return None
    lib = ctypes.CDLL(spec.origin)
    lib.mc_pcb_beta.argtypes = [_P, ctypes.c_int, _L, _P, _P, ctypes.c_int, _P, _L]
    lib.mc_pcb_beta.restype = ctypes.c_int
    lib.mc_pcb_merge.argtypes = [_P, ctypes.c_int, _L, _P, _P, _P, _P, ctypes.c_int, _P, ctypes.c_float, _P]
    lib.mc_pcb_merge.restype = ctypes.c_int
    lib.mc_pcb_merge_bits.argtypes = [_P, ctypes.c_int, _L, _P, _P, _P, _P, _P, ctypes.c_int, _P, ctypes.c_float, _P]
    lib.mc_pcb_merge_bits.restype = ctypes.c_int
    lib.mc_bracket_scan.argtypes = [_P, _L, ctypes.c_float, ctypes.c_float, _P, _P]
    lib.mc_bracket_scan.restype = _L
    lib.mc_pcb_stage1.argtypes = [_P, ctypes.c_int, _L, _P, _P, ctypes.c_int, _P, _P, _P, _P, _L, _P, _P, _P, _P, _P]
    lib.mc_pcb_stage1.restype = ctypes.c_int
    lib.mc_abs_brackets.argtypes = [_P, ctypes.c_int, _L, ctypes.c_int, _P, _P, _P, _P, _L, _P, _P]
    lib.mc_abs_brackets.restype = ctypes.c_int
    lib.mc_abs_ranks.argtypes = [_P, _L, _L, _P]
    lib.mc_abs_ranks.restype = ctypes.c_int
    lib.mc_all_finite.argtypes = [_P, ctypes.c_int, _L]
    lib.mc_all_finite.restype = ctypes.c_int
    lib.mc_mark_above.argtypes = [_P, ctypes.c_int, _L, _L, _P, _P]
    lib.mc_mark_above.restype = _L
    lib.mc_family_merge.argtypes = [_P, ctypes.c_int, _L, _P, _P, _P]
    lib.mc_family_merge.restype = ctypes.c_int
    lib.mc_family_signs.argtypes = [_P, ctypes.c_int, _L, _P, _P, _P]
    lib.mc_family_signs.restype = ctypes.c_int
    lib.mc_family_l1.argtypes = [_P, ctypes.c_int, _L, _P, _L, _P, _P, _P]
    lib.mc_family_l1.restype = ctypes.c_int
    lib.mc_use_portable.argtypes = [ctypes.c_int]
    lib.mc_use_portable.restype = None
    lib.mc_mt_seed.argtypes = [_P, ctypes.c_uint64]
    lib.mc_mt_seed.restype = None
    lib.mc_mt_uniform.argtypes = [_P, _L, _P]
    lib.mc_mt_uniform.restype = None
    lib.mc_mt_keep.argtypes = [_P, _L, ctypes.c_float, _P]
    lib.mc_mt_keep.restype = None
    return lib


_lib = _load()


def available() -> bool:
    return _lib is not None


@contextlib.contextmanager
def portable_paths():
    """Within: the kernels take their portable paths where they have CPU-specific ones (AVX-512,
    F16C), as on a CPU without those; for checking that both give the same results."""
    _lib.mc_use_portable(1)
    try:
        yield
    finally:
        _lib.mc_use_portable(0)


def library_path() -> str | None:
    """The loaded kernel library's file (None where it is not in use)."""
    return None if _lib is None else _lib._name


_STORED_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}


@dataclass
class StoredColumns:
    """A chunk's columns as stored on disk: θ0 (C,) and each θ_i (C,) in their storage dtype
    (possibly views of memory-mapped files). The kernels compute τ_i = float(θ_i) − float(θ0)
    as they load each tile (exactly the reader's float32 subtraction), which spares a float32
    copy of the chunk per pass. `lasting`: the tensors are views of the sources, not buffers the
    next read reuses, so work on them may go on after the call they were handed to returns."""

    base: torch.Tensor
    models: list[torch.Tensor]
    lasting: bool = False

    def __post_init__(self):
        self.models = list(self.models)  # a 2-D tensor gives its rows

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.models), self.base.numel()

    @property
    def device(self) -> torch.device:
        return self.base.device

    def columns(self, start: int, stop: int) -> "StoredColumns":
        return StoredColumns(self.base[start:stop], [m[start:stop] for m in self.models], self.lasting)

    @staticmethod
    def supports(dtype: torch.dtype) -> bool:
        return _lib is not None and dtype in _STORED_DTYPES


def materialise(x) -> torch.Tensor:
    """The float32 task vectors (n, w) of `x` (a tensor is returned as it is)."""
    if not isinstance(x, StoredColumns):
        return x
    return torch.sub(torch.stack(x.models), x.base.float())  # float(θ_i) − float(θ0), as the reader does


def lasting(x) -> bool:
    """Whether work on `x` may go on after the call it was handed to returns (`StoredColumns.lasting`)."""
    return isinstance(x, StoredColumns) and x.lasting


def columns(x, start: int, stop: int):
    """Columns [start, stop) of a task-vector matrix or of `StoredColumns`."""
    return x.columns(start, stop) if isinstance(x, StoredColumns) else x[:, start:stop]


class _Src(ctypes.Structure):  # src_t in _native.c
    _fields_ = [("tau", _P), ("ld", _L), ("base", _P), ("models", ctypes.POINTER(_P)), ("dtype", ctypes.c_int)]


def _src(x) -> _Src:
    if isinstance(x, StoredColumns):
        rows = (_P * len(x.models))(*[m.data_ptr() for m in x.models])
        src = _Src(None, 0, x.base.data_ptr(), ctypes.cast(rows, ctypes.POINTER(_P)), _STORED_DTYPES[x.base.dtype])
        src._rows = rows  # keep the pointer array alive with the struct
        return src
    return _Src(x.data_ptr(), x.stride(0), None, None, 0)


def usable(x) -> bool:
    """Whether `x` (a 1-D tensor, a 2-D one with contiguous rows, or `StoredColumns`) can go to
    the native kernels."""
    if _lib is None:
        return False
    if isinstance(x, StoredColumns):
        return (
            x.base.dtype in _STORED_DTYPES
            and x.device.type == "cpu"
            and x.base.stride(-1) == 1
            and all(
                m.dtype == x.base.dtype and m.device.type == "cpu" and m.stride(-1) == 1 and m.numel() == x.base.numel()
                for m in x.models
            )
        )
    return x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad and x.stride(-1) == 1


def _collect_buffer(rows: int, w: int) -> np.ndarray:
    """This thread's (rows, >= w + 1) float32 buffer for the values brackets collect (the kernels
    store one past the last value they keep); valid until the thread's next call here."""
    buf = getattr(_local, "collect", None)
    if buf is None or buf.shape[0] < rows or buf.shape[1] < w + 1:
        buf = _local.collect = np.empty((rows, max(w + 1, 1 << 17)), dtype=np.float32)
    return buf


def _floats(values) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32)


def _check(code: int) -> None:
    if code != 0:
        raise MemoryError("mcomp.merge._native: out of memory for a tile buffer")


def pcb_beta(tau, lo: list[float], hi: list[float], inter: str, out: torch.Tensor) -> torch.Tensor:
    """PCB's β (steps 1-5) of `tau` (n, w), a tensor or `StoredColumns`, into `out` (n, w)."""
    n, w = tau.shape
    lo_a, hi_a = _floats(lo), _floats(hi)
    src = _src(tau)
    _check(
        _lib.mc_pcb_beta(
            ctypes.byref(src), n, w, lo_a.ctypes.data, hi_a.ctypes.data, _VARIANTS[inter], out.data_ptr(), out.stride(0)
        )
    )
    return out


def pcb_merge(
    tau,
    stats: dict,
    inter: str,
    weights: list[float] | None,
    scale: float,
    out: torch.Tensor,
    bits: np.ndarray | None = None,
) -> None:
    """PCB steps 1-7 on the w columns of `tau` (n, w; a tensor or `StoredColumns`), merged values
    to `out` (w,). With `bits` (stage 1's candidate bits of these columns, np.packbits order), β
    is computed only where a bit is set, and `out` gets exact zeros elsewhere."""
    n, w = tau.shape
    arrays = [_floats(stats[k]) for k in ("lo", "hi", "t", "m")]
    wts = _floats(weights) if weights is not None else None
    src = _src(tau)
    args = [
        *[a.ctypes.data for a in arrays],
        _VARIANTS[inter],
        wts.ctypes.data if wts is not None else None,
        scale,
        out.data_ptr(),
    ]
    if bits is None:
        _check(_lib.mc_pcb_merge(ctypes.byref(src), n, w, *args))
        return
    bits = np.ascontiguousarray(bits, dtype=np.uint8)
    if bits.size != (w + 7) // 8:
        raise ValueError(f"pcb_merge: {bits.size} bytes of bits for {w} columns")
    _check(_lib.mc_pcb_merge_bits(ctypes.byref(src), n, w, bits.ctypes.data, *args))


@dataclass
class Stage1Block:
    """What one block of columns contributes to PCB's stage 1 (see `pcb_stage1`)."""

    below: list[int]  # per row: β below the row's bracket
    inside: list[np.ndarray | int]  # per row: the β inside it, in column order (a point bracket: their count)
    maxima: torch.Tensor  # per row: the largest β (see pcb_stage1 for where it is exact)
    bits: np.ndarray | None  # candidate bits (np.packbits order), when floors were given
    marked: int


def pcb_stage1(
    tau,
    lo: list[float],
    hi: list[float],
    inter: str,
    brackets: list[tuple[float, float]],
    floors: list[float] | None,
    maxima: torch.Tensor | None = None,
) -> Stage1Block:
    """PCB's β on the columns of `tau` (n, w) reduced on the fly: per row i, the count below and
    the values inside `brackets[i]`, and the maximum (of these columns and `maxima`, per row a β
    of other columns of the same rows, or -inf); with `floors`, the candidate bits of `mark_above`.
    β itself is never stored. Variant v1 (up to 32 tasks) computes β only where a cheap estimate
    leaves a column open, so a row's maximum is exact where it reaches min(bracket low, floor) of
    its row and is otherwise some value below it (as is then the row's k-th value)."""
    n, w = tau.shape
    buf = _collect_buffer(n, w)
    below, found = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    if maxima is None:
        maxima = np.full(n, -np.inf, dtype=np.float32)
    else:
        maxima = maxima.detach().to("cpu", torch.float32).numpy().copy()
    bits = np.empty((w + 7) // 8, dtype=np.uint8) if floors is not None else None
    marked = ctypes.c_int64()
    lo_a, hi_a = _floats(lo), _floats(hi)
    blo, bhi = _floats([b[0] for b in brackets]), _floats([b[1] for b in brackets])
    f = _floats(floors) if floors is not None else None
    src = _src(tau)
    _check(
        _lib.mc_pcb_stage1(
            ctypes.byref(src),
            n,
            w,
            lo_a.ctypes.data,
            hi_a.ctypes.data,
            _VARIANTS[inter],
            blo.ctypes.data,
            bhi.ctypes.data,
            below.ctypes.data,
            buf.ctypes.data,
            buf.shape[1],
            found.ctypes.data,
            maxima.ctypes.data,
            f.ctypes.data if f is not None else None,
            bits.ctypes.data if bits is not None else None,
            ctypes.byref(marked),
        )
    )
    return Stage1Block(
        below=[int(b) for b in below],
        inside=[_inside(buf[i], int(found[i]), *brackets[i]) for i in range(n)],
        maxima=torch.from_numpy(maxima),
        bits=bits,
        marked=marked.value,
    )


def _inside(row: np.ndarray, found: int, lo: float, hi: float) -> np.ndarray | int:
    """A bracket's result: the values collected, or for a point bracket (lo == hi) their count."""
    return found if lo == hi else row[:found].copy()


class AbsBrackets(NamedTuple):
    """What `abs_brackets` found in a block of columns."""

    below: list[int]  # per bracket, row by row: |τ| below it
    inside: list[np.ndarray | int]  # per bracket: the |τ| inside it in column order (a point bracket: their count)
    finite: bool  # every τ_i of the block is finite


def abs_brackets(tau, brackets: list[list[tuple[float, float]]]) -> AbsBrackets:
    """Order-statistic brackets over |τ| of `tau` (n, w; a tensor or `StoredColumns`), the same
    number per row, and whether every τ_i is finite (checked on the way: the values are loaded
    anyway). A point bracket (lo == hi) gets the count of values equal to it."""
    n, w = tau.shape
    nb = len(brackets[0])
    flat = [b for row in brackets for b in row]
    buf = _collect_buffer(len(flat), w)
    below, found = np.zeros(len(flat), dtype=np.int64), np.zeros(len(flat), dtype=np.int64)
    blo, bhi = _floats([b[0] for b in flat]), _floats([b[1] for b in flat])
    finite = ctypes.c_int()
    src = _src(tau)
    _check(
        _lib.mc_abs_brackets(
            ctypes.byref(src),
            n,
            w,
            nb,
            blo.ctypes.data,
            bhi.ctypes.data,
            below.ctypes.data,
            buf.ctypes.data,
            buf.shape[1],
            found.ctypes.data,
            ctypes.byref(finite),
        )
    )
    return AbsBrackets(
        [int(b) for b in below],
        [_inside(buf[q], int(found[q]), *flat[q]) for q in range(len(flat))],
        bool(finite.value),
    )


def abs_ranks(x: torch.Tensor) -> torch.Tensor:
    """Stable ascending ranks (int32) of |x| along the last dimension of the float32 `x` (ties in
    position order): where each value lands in torch.argsort(x.abs(), dim=-1, stable=True)."""
    x = x.detach().contiguous()
    rank = torch.empty(x.shape, dtype=torch.int32)
    length = x.shape[-1] if x.dim() else 1
    if x.numel():
        _check(_lib.mc_abs_ranks(x.data_ptr(), x.numel() // length, length, rank.data_ptr()))
    return rank


def all_finite(tau) -> bool:
    """Whether every τ_i of `tau` (a tensor or `StoredColumns`) is finite."""
    n, w = tau.shape
    src = _src(tau)
    ok = _lib.mc_all_finite(ctypes.byref(src), n, w)
    if ok < 0:
        _check(ok)
    return bool(ok)


def bracket_scan(row: torch.Tensor, lo: float, hi: float) -> tuple[int, np.ndarray]:
    """(values < lo, the values v with lo <= v <= hi in stream order) of a 1-D row; lo < hi."""
    if not lo < hi:
        raise ValueError(f"bracket_scan needs lo < hi, got [{lo}, {hi}]")
    w = row.numel()
    buf = _collect_buffer(1, w)[0]
    below = ctypes.c_int64()
    k = _lib.mc_bracket_scan(row.data_ptr(), w, lo, hi, buf.ctypes.data, ctypes.byref(below))
    return below.value, buf[:k].copy()


def mark_above(x: torch.Tensor, floors: list[float]) -> tuple[np.ndarray, int]:
    """(np.packbits of "some row i has x[i, j] > floors[i]", how many j) for x (n, w)."""
    n, w = x.shape
    bits = np.empty((w + 7) // 8, dtype=np.uint8)
    f = _floats(floors)
    marked = _lib.mc_mark_above(x.data_ptr(), n, w, x.stride(0), f.ctypes.data, bits.ctypes.data)
    return bits, int(marked)


class FamilyArgs(ctypes.Structure):  # family_args_t in _native.c
    _fields_ = [
        ("thr", _P),
        ("keep", _P),
        ("ldk", _L),
        ("density", ctypes.c_float),
        ("rescale", _P),
        ("weights", _P),
        ("consensus", ctypes.c_int),
        ("plain", ctypes.c_int),
        ("majority", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


_CONSENSUS = {None: 0, "mass": 1, "frequency": 2}


def family_args(
    *,
    thresholds: list[float] | None = None,
    keep: torch.Tensor | None = None,
    density: float = 1.0,
    rescale: list[float] | None = None,
    weights: list[float] | None = None,
    sign: str | None = None,
    plain: bool = False,
    majority: float = 0.0,
    scale: float = 1.0,
) -> FamilyArgs:
    """The task-arithmetic family's steps for `family_merge`/`family_signs` (see `family_args_t`):
    `keep` is DARE's mask (n, C; uint8, [u < density] of its draws) for the columns the kernels see,
    `sign` the election (None: a plain sum). The arrays are kept alive on the returned struct."""
    thr, res, wts = (None if v is None else _floats(v) for v in (thresholds, rescale, weights))
    args = FamilyArgs(
        thr=None if thr is None else thr.ctypes.data,
        keep=None if keep is None else keep.data_ptr(),
        ldk=0 if keep is None else keep.stride(0),
        density=density,
        rescale=None if res is None else res.ctypes.data,
        weights=None if wts is None else wts.ctypes.data,
        consensus=_CONSENSUS[sign],
        plain=int(plain),
        majority=majority,
        scale=scale,
    )
    args._keep = (thr, res, wts, keep)
    return args


def _offset(args: FamilyArgs, start: int) -> FamilyArgs:
    """`args` for the columns from `start` on (the mask moves with them)."""
    if not args.keep or start == 0:
        return args
    moved = FamilyArgs.from_buffer_copy(args)
    moved.keep = args.keep + start
    moved._keep = args._keep
    return moved


def family_merge(tau, args: FamilyArgs, out: torch.Tensor, start: int = 0) -> bool:
    """The family's merged values of `tau` (n, w; a tensor or `StoredColumns`, the columns from `start`
    of those `args` was made for) into `out` (w,); returns whether every τ_i was finite."""
    n, w = tau.shape
    src = _src(tau)
    finite = ctypes.c_int()
    args = ctypes.byref(_offset(args, start))
    _check(_lib.mc_family_merge(ctypes.byref(src), n, w, args, out.data_ptr(), ctypes.byref(finite)))
    return bool(finite.value)


def family_signs(tau, args: FamilyArgs, start: int = 0) -> tuple[int, bool]:
    """(#{elected sign > 0} − #{< 0}, whether every τ_i is finite) over the columns of `tau` (as
    `family_merge`)."""
    n, w = tau.shape
    src = _src(tau)
    balance, finite = ctypes.c_int64(), ctypes.c_int()
    _check(
        _lib.mc_family_signs(
            ctypes.byref(src), n, w, ctypes.byref(_offset(args, start)), ctypes.byref(balance), ctypes.byref(finite)
        )
    )
    return balance.value, bool(finite.value)


def family_l1(tau, keep: torch.Tensor, start: int = 0) -> tuple[np.ndarray, np.ndarray, bool]:
    """(Σ|τ_i|, Σ|τ_i|·keep_i) per row, float64, over the columns of `tau`, which are the columns
    from `start` of the chunk whose DARE mask `keep` (n, C; uint8) holds; and whether every τ_i is
    finite."""
    n, w = tau.shape
    before, after = np.zeros(n), np.zeros(n)
    finite = ctypes.c_int()
    src = _src(tau)
    _check(
        _lib.mc_family_l1(
            ctypes.byref(src),
            n,
            w,
            keep.data_ptr() + start,
            keep.stride(0),
            before.ctypes.data,
            after.ctypes.data,
            ctypes.byref(finite),
        )
    )
    return before, after, bool(finite.value)


class TorchUniformStream:
    """torch.rand(count, generator=torch.Generator().manual_seed(seed)) drawn in pieces, the same bits:
    torch's CPU generator (mt19937) and its float32 uniform, in the native library (the GIL is
    released, so several streams draw at once)."""

    def __init__(self, seed: int):
        self.state = np.empty(625, dtype=np.uint32)
        _lib.mc_mt_seed(self.state.ctypes.data, seed & ((1 << 64) - 1))

    def draw(self, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous float32 `out` with the stream's next out.numel() uniforms."""
        _lib.mc_mt_uniform(self.state.ctypes.data, out.numel(), out.data_ptr())
        return out

    def keep(self, out: torch.Tensor, density: float) -> torch.Tensor:
        """Fill the contiguous uint8 `out` with [u < density] of the stream's next out.numel() uniforms."""
        _lib.mc_mt_keep(self.state.ctypes.data, out.numel(), density, out.data_ptr())
        return out
