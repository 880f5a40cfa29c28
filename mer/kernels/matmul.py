# Dimensions: N = output rows (features out), K = input cols (features in), n = tokens.
#
# Public entry points for weight packing and x @ W.T. Each weight kind lives in its own module
# (mm_<kind>.py) exposing KIND, BLOCK, BLOCK_BYTES, from_raw, dequantize, run (and from_array
# for float kinds); this file only validates arguments and dispatches through _KINDS, so a new
# kind is one more module in the table.
#
# The kernels are numba functions cached in mer/kernels/__pycache__. numba's cache notices an
# edit to a function's own file only, not to the helpers or constants it uses from another
# module (mm_f32.py holds the shared ones): after editing those, delete the *.nbi/*.nbc files.
from __future__ import annotations

import contextlib
import contextvars
import functools
import time
from dataclasses import dataclass
from types import ModuleType

import numba
import numpy as np

from . import ACTIVATIONS, mm_f32, mm_gguf, mm_half, mm_q4_0, mm_q8_0, mm_x16
from .quantize import quantize_blocks
from .threads import ThreadPolicy

_KINDS: dict[str, ModuleType] = {
    m.KIND: m
    for m in (mm_f32, mm_half.F16, mm_half.BF16, mm_q8_0, mm_q4_0, *mm_gguf.KINDS, mm_gguf.MXFP4)
    + mm_x16.KINDS
}
# With 8-bit activations, the block types mm_x16 has integer kernels for (every quantized one:
# Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4, Q4_K, Q5_K, Q6_K) are packed row-interleaved for them
# when their rows come in whole groups of 16; float kinds keep float activations.
_INTEGER = {m.base.KIND: m.KIND for m in mm_x16.KINDS}
_PLAIN = {v: k for k, v in _INTEGER.items()}
# How packing meets activations: what the innermost `packing` block of this thread set, else
# "f32" (models are opened in "q8" unless told otherwise: mer.model.load_model)
_packing: contextvars.ContextVar[str] = contextvars.ContextVar("packing", default="f32")
FLOAT_DTYPES = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}
_QUANT_KINDS = ("q8_0", "q4_0")
_threads = numba.config.NUMBA_NUM_THREADS  # all cores until set_num_threads
_policy = ThreadPolicy(_threads)  # how many of them each call gets
_PAR_MIN_WORK = 1 << 18
# Every token through the per-token path, so that a token's row does not depend on how many
# others share the call (batch invariance); False lets prefill use the faster tiles.
_per_token = True


@dataclass(frozen=True, eq=False)  # eq=False: compare by identity, never array-wise
class PackedWeight:
    """A [rows, cols] weight matrix in a kernel-ready layout (see the mm_<kind> modules)."""

    kind: str
    rows: int
    cols: int
    planes: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        """Bytes held in planes."""
        return sum(int(p.nbytes) for p in self.planes)

    @property
    def gguf_nbytes(self) -> int:
        """Bytes of this matrix in GGUF encoding."""
        return self.rows * row_bytes(self.kind, self.cols)

    @property
    def block_size(self) -> int:
        """Column granularity: 32 for q8_0/q4_0, 1 for float kinds."""
        return _KINDS[self.kind].BLOCK

    @functools.cached_property
    def addresses(self) -> tuple[int, ...]:
        """Each plane's data address (mer.kernels.grouped views planes in place by them)."""
        return tuple(p.ctypes.data for p in self.planes)

    def __getstate__(self) -> dict:
        # addresses belong to this process's arrays: a copy elsewhere finds its own
        return {k: v for k, v in self.__dict__.items() if k != "addresses"}


def _kind(kind: str) -> ModuleType:
    if kind not in _KINDS:
        raise ValueError(f"unknown weight kind {kind!r}; known kinds: {', '.join(_KINDS)}")
    return _KINDS[kind]


def row_bytes(kind: str, cols: int) -> int:
    """Bytes of one row of `cols` weights of `kind` in GGUF encoding (ValueError if `kind` is
    unknown or `cols` not a whole number of its blocks)."""
    m = _kind(kind)
    if cols % m.BLOCK:
        raise ValueError(f"{kind} rows of {cols}: not a multiple of the block size {m.BLOCK}")
    return (cols // m.BLOCK) * m.BLOCK_BYTES


def pack_float(arr: np.ndarray, kind: str) -> PackedWeight:
    """Wrap a float matrix: "f32" float32, "f16" float16, "bf16" uint16 raw bfloat16 bits.

    Zero-copy when arr is C-contiguous (arr may be a np.memmap); layout stays row-major.
    """
    if kind not in FLOAT_DTYPES:
        raise ValueError(f"pack_float: kind must be one of {', '.join(FLOAT_DTYPES)}, got {kind!r}")
    want = np.dtype(FLOAT_DTYPES[kind])
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype != want:
        got = (getattr(arr, "dtype", type(arr).__name__), getattr(arr, "shape", None))
        raise ValueError(f"pack_float({kind!r}) needs a 2-D {want} array, got {got[0]} {got[1]}")
    return PackedWeight(kind, arr.shape[0], arr.shape[1], _KINDS[kind].from_array(arr))


def quantize(arr: np.ndarray, kind: str) -> PackedWeight:
    """float32 [N, K] -> "q8_0" or "q4_0" weight (llama.cpp rounding); K % 32 != 0 -> ValueError."""
    if kind not in _QUANT_KINDS:
        raise ValueError(f"quantize: kind must be 'q8_0' or 'q4_0', got {kind!r}")
    a = np.asarray(arr)
    if a.ndim != 2 or a.shape[1] % 32 != 0:
        raise ValueError(
            f"quantize({kind!r}): need [N, K] with K a multiple of 32, got shape {a.shape}"
        )
    return from_gguf_blocks(quantize_blocks(a, kind), kind, a.shape[0], a.shape[1])


def requantize(w: PackedWeight, quant: str | None) -> PackedWeight:
    """`w` re-quantized to "q8_0" or "q4_0" from its float32 values; unchanged when `quant` is
    None or already its kind."""
    if quant is None or plain_kind(w.kind) == quant:
        return w
    return quantize(dequantize(w), quant)


def from_gguf_blocks(
    raw: np.ndarray, kind: str, rows: int, cols: int, activations: str | None = None
) -> PackedWeight:
    """GGUF block bytes (uint8, row-major) of a [rows, cols] matrix -> PackedWeight.

    Quantized kinds are repacked into their kernel layout (for `activations`, default: the
    mode in force, see `packed_kind`); float kinds stay zero-copy views.
    """
    m = _kind(kind)
    if cols % m.BLOCK != 0:
        raise ValueError(f"{kind} matrix [{rows}, {cols}]: cols must be a multiple of {m.BLOCK}")
    need = rows * (cols // m.BLOCK) * m.BLOCK_BYTES
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.size != need:
        raise ValueError(
            f"{kind} matrix [{rows}, {cols}] needs {need} uint8 bytes, got {raw.size} {raw.dtype}"
        )
    raw = np.ascontiguousarray(raw).reshape(-1)
    kind = packed_kind(kind, rows, activations)
    return PackedWeight(kind, rows, cols, _KINDS[kind].from_raw(raw, rows, cols))


def packed_kind(kind: str, rows: int, mode: str | None = None) -> str:
    """The kind GGUF blocks of `kind` are packed as for activations `mode` (default: the mode
    in force): with "q8", matrices of whole 16-row groups of a block type that has an integer
    kernel become its integer kind ("q4_0" -> "q4_0x16")."""
    mode = activations() if mode is None else _check_mode(mode)
    if mode == "q8" and kind in _INTEGER and rows % mm_x16.GROUP == 0:
        return _INTEGER[kind]
    return kind


def plain_kind(kind: str) -> str:
    """The GGUF block type a kind holds ("q4_0x16" -> "q4_0")."""
    return _PLAIN.get(kind, kind)


@functools.cache
def _row_planes(kind: str, cols: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    m = _kind(kind)
    if kind in FLOAT_DTYPES:
        raw = np.zeros((1, cols), FLOAT_DTYPES[kind]).view(np.uint8).reshape(-1)
        return tuple((p.dtype.str, p.shape[1:]) for p in m.from_raw(raw, 1, cols))
    rows = mm_x16.GROUP if kind in _PLAIN else 1  # the integer kinds pack whole groups
    raw = np.zeros(rows * (cols // m.BLOCK) * m.BLOCK_BYTES, np.uint8)
    return tuple((p.dtype.str, p.shape[1:]) for p in m.from_raw(raw, rows, cols))


def plane_specs(kind: str, rows: int, cols: int) -> list[tuple[str, tuple[int, ...]]]:
    """The (dtype, shape) of each plane of a [rows, cols] matrix of `kind`, as packing makes
    them (every plane's first dimension is the row). ValueError for an impossible matrix."""
    if rows < 1 or cols < 1:
        raise ValueError(f"{kind} matrix [{rows}, {cols}]: dimensions must be positive")
    if cols % _kind(kind).BLOCK:
        raise ValueError(f"{kind} matrix [{rows}, {cols}]: cols must be a multiple of its block")
    if kind in _PLAIN and rows % mm_x16.GROUP:
        raise ValueError(f"{kind} matrix [{rows}, {cols}]: rows must be a multiple of 16")
    return [(dtype, (rows, *shape)) for dtype, shape in _row_planes(kind, cols)]


def dequantize_blocks(raw: np.ndarray, kind: str, rows: int, cols: int) -> np.ndarray:
    """float32 [rows, cols] of GGUF blocks of `kind` (e.g. embedding rows), whatever the
    activations mode."""
    m = _kind(kind)
    return m.dequantize(m.from_raw(np.ascontiguousarray(raw).reshape(-1), rows, cols), rows, cols)


def dequantize(w: PackedWeight) -> np.ndarray:
    """float32 [N, K]; exactly gguf.quants.dequantize of the same blocks."""
    return _kind(w.kind).dequantize(w.planes, w.rows, w.cols)


def _check_range(name: str, rng: tuple[int, int] | None, size: int, align: int) -> tuple[int, int]:
    if rng is None:
        return 0, size
    a, b = (int(v) for v in rng)
    if not 0 <= a <= b <= size:
        raise ValueError(f"matmul: {name}={rng} is outside [0, {size}]")
    if a % align or b % align:
        raise ValueError(f"matmul: {name}={rng} must be multiples of the block size {align}")
    return a, b


def _check_x(x: np.ndarray, cols: int, what: str) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        got = f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"
        raise ValueError(f"{what}: x must be a 2-D float32 [n, {cols}] array, got {got}")
    if x.shape[1] != cols or x.shape[0] < 1:
        raise ValueError(f"{what}: x must have shape [n>=1, {cols}], got {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{what}: x must be C-contiguous (use np.ascontiguousarray)")


def _check_out(out: np.ndarray, n: int, rows: int, what: str) -> None:
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (n, rows):
        got = f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}"
        raise ValueError(f"{what}: out must be a float32 [{n}, {rows}] array, got {got}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{what}: out must be C-contiguous and writeable")


def run_kernel(
    w: PackedWeight,
    x: np.ndarray,
    out: np.ndarray,
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    xoff: int,
    ooff: int,
) -> None:
    """Unchecked core: out[:, r-ooff] = sum_c x[:, c-xoff] * W[r, c] for r0<=r<r1, c0<=c<c1."""
    if r1 <= r0:
        return
    if c1 <= c0:
        out[:, r0 - ooff : r1 - ooff] = 0.0
        return
    kernel = _KINDS[w.kind]
    n = x.shape[0]
    run_policed(
        (w.kind, r1 - r0, c1 - c0, n.bit_length()),
        (r1 - r0) * (c1 - c0) * n,
        lambda nt: kernel.run(w.planes, x, out, r0, r1, c0, c1, xoff, ooff, nt, _per_token),
    )


def parallel_worth(work: int) -> bool:
    """Whether a kernel call of `work` multiply-adds may go parallel: below ~2^18 a launch
    costs more than it saves."""
    return _threads > 1 and work >= _PAR_MIN_WORK


def run_policed(key: tuple, work: int, call) -> None:
    """call(nt) on the threads the policy gives the kind of work `key` (one when `work`
    multiply-adds are too few to go parallel), its time recorded for the next choices."""
    if not parallel_worth(work):
        call(1)
        return
    nt = _policy.choose(key)
    if nt > 1 and numba.get_num_threads() != nt:
        numba.set_num_threads(nt)  # numba's count is per calling thread
    start = time.perf_counter()
    call(nt)
    _policy.record(key, nt, work, time.perf_counter() - start)


def matmul(
    w: PackedWeight,
    x: np.ndarray,
    out: np.ndarray | None = None,
    row_range: tuple[int, int] | None = None,
    col_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """out[:, r0:r1] = x[:, c0:c1] @ W[r0:r1, c0:c1].T; other columns of out are untouched.

    x: float32 [n, K] C-contiguous; out: float32 [n, N] (zeros when None). c0, c1 must be
    multiples of w.block_size. Returns out.
    """
    _kind(w.kind)
    _check_x(x, w.cols, "matmul")
    if out is None:
        out = np.zeros((x.shape[0], w.rows), np.float32)
    _check_out(out, x.shape[0], w.rows, "matmul")
    r0, r1 = _check_range("row_range", row_range, w.rows, 1)
    c0, c1 = _check_range("col_range", col_range, w.cols, w.block_size)
    run_kernel(w, x, out, r0, r1, c0, c1, 0, 0)
    return out


def set_num_threads(n: int, adaptive: bool = True) -> None:
    """Threads a kernel call may use (numba prange over row chunks): with `adaptive`, each
    call gets 1 or up to n, whichever measures faster (mer.kernels.threads), else always n."""
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= int(n) <= limit:
        raise ValueError(f"set_num_threads: n must be in [1, {limit}], got {n}")
    global _threads, _policy
    _threads = int(n)
    _policy = ThreadPolicy(_threads, adaptive=adaptive)
    numba.set_num_threads(_threads)


def set_batch_invariant(on: bool) -> None:
    """With `on` (the default) a token's result does not depend on how many tokens share a
    matmul: every token takes the per-token path. Off, prefill of many tokens runs faster
    through dequantized tiles, and a token's last bits depend on its batch."""
    global _per_token
    _per_token = bool(on)


def _check_mode(mode: str) -> str:
    if mode not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {mode!r}")
    return mode


def activations() -> str:
    """The activations mode packing follows here: the innermost `packing` block's, else
    "f32". "f32": float activations, within float rounding of the dequantized weights. "q8":
    quantized matrices (every GGUF block type) are packed for activations
    quantized to 8 bits per token and integer dot products, as llama.cpp's CPU backend
    computes them (several times faster)."""
    return _packing.get()


@contextlib.contextmanager
def packing(mode: str | None):
    """Pack for activations `mode` inside the block (this thread only); None: no change."""
    if mode is None:
        yield
        return
    token = _packing.set(_check_mode(mode))
    try:
        yield
    finally:
        _packing.reset(token)


def activations_of(kinds) -> str:
    """The mode a model's packed kinds were made in: "q8" if any is an integer kind."""
    return "q8" if any(k in _PLAIN for k in kinds) else "f32"


def batch_invariant() -> bool:
    return _per_token


def get_num_threads() -> int:
    """The most threads a kernel call uses."""
    return _threads


def thread_policy() -> ThreadPolicy:
    """The policy that gives kernel calls their thread counts."""
    return _policy
