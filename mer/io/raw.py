"""Raw tensor views from model files, as float32."""

from __future__ import annotations

import numpy as np


def to_float32(arr: np.ndarray, kind: str) -> np.ndarray:
    """A float32 copy of a float tensor view: kind "f32", "f16", or "bf16" (raw uint16 bits)."""
    if kind == "bf16":
        return (np.asarray(arr, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if kind in ("f32", "f16"):
        return np.asarray(arr, dtype=np.float32)
    raise ValueError(f"to_float32: {kind} is not a float kind")
