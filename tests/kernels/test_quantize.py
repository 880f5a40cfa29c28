"""mer.kernels.quantize: Q8_0 / Q4_0 blocks byte-identical to gguf.quants.quantize."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mer.kernels.quantize import quantize_blocks

TYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}
# Scales beyond the f16 range become inf in both implementations; gguf warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


def tricky_matrix(rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((12, 160)).astype(np.float32)
    a[0] = 0.0  # all-zero row: scale 0
    a[1] = -0.0
    a[2, 7] = 1e4  # big positive outlier
    a[3, 40] = -3e5  # big negative outlier: Q4_0 scale from a negative max
    a[4] = -np.abs(a[4])  # negative-max row
    a[5, :32] = np.arange(-16, 16) * 0.5  # exact halves: round-half-away ties in Q8_0
    a[6, 32:64] = 3.0
    a[6, 40] = -3.0  # equal magnitudes of both signs: the first one wins in Q4_0
    a[7] *= 1e-20  # tiny but normal values
    a[8] *= 6e4  # scales near the f16 overflow edge
    a[9, 64:96] = 1.0  # constant block
    a[10, ::3] = 0.0
    a[11] = np.float32(1) / 3
    return a


@pytest.mark.parametrize("kind", list(TYPES))
def test_byte_identical_on_tricky_rows(kind):
    a = tricky_matrix(np.random.default_rng(0))
    want = gguf.quants.quantize(a, TYPES[kind])
    got = quantize_blocks(a, kind)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("scale", [1e-3, 1.0, 250.0])
def test_byte_identical_on_random_data(kind, scale):
    rng = np.random.default_rng(int(scale * 1000))
    a = (rng.standard_normal((33, 256)) * scale).astype(np.float32)
    a[rng.random(a.shape) < 0.01] *= 100.0
    assert np.array_equal(quantize_blocks(a, kind), gguf.quants.quantize(a, TYPES[kind]))


# Finite floats whose block scales stay normal float32 (tiny subnormal scales overflow 1/d to
# inf in both implementations, where the C cast of inf is undefined).
_values = st.floats(-1e6, 1e6, width=32).map(lambda v: v if abs(v) > 1e-30 else 0.0)


@settings(max_examples=60, deadline=None)
@given(
    a=hnp.arrays(
        np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64])), elements=_values
    )
)
def test_byte_identical_property(a):
    for kind, qtype in TYPES.items():
        assert np.array_equal(quantize_blocks(a, kind), gguf.quants.quantize(a, qtype))


def test_accepts_float64_and_noncontiguous_like_gguf():
    a = np.random.default_rng(1).standard_normal((8, 128))
    for kind, qtype in TYPES.items():
        assert np.array_equal(quantize_blocks(a, kind), gguf.quants.quantize(a, qtype))
        b = a.astype(np.float32)[::2]
        assert np.array_equal(quantize_blocks(b, kind), gguf.quants.quantize(b, qtype))


def test_rejects_bad_shapes_and_kinds():
    with pytest.raises(ValueError, match=r"\(4, 48\)"):
        quantize_blocks(np.zeros((4, 48), np.float32), "q8_0")
    with pytest.raises(ValueError, match="shape"):
        quantize_blocks(np.zeros(64, np.float32), "q4_0")
    with pytest.raises(ValueError, match="kind"):
        quantize_blocks(np.zeros((1, 32), np.float32), "q4_1")
