"""GGUF files (llama.cpp's format) through the `gguf` package: metadata and zero-copy
tensor views, with every failure turned into one line that names the file or tensor."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from mer.errors import ModelFormatError

# GGUF block type -> mer kind (the names the kernels dispatch on)
KINDS: dict[GGMLQuantizationType, str] = {
    GGMLQuantizationType.F32: "f32",
    GGMLQuantizationType.F16: "f16",
    GGMLQuantizationType.BF16: "bf16",
    GGMLQuantizationType.Q8_0: "q8_0",
    GGMLQuantizationType.Q4_0: "q4_0",
    GGMLQuantizationType.Q4_1: "q4_1",
    GGMLQuantizationType.Q5_0: "q5_0",
    GGMLQuantizationType.Q5_1: "q5_1",
    GGMLQuantizationType.Q4_K: "q4_k",
    GGMLQuantizationType.Q5_K: "q5_k",
    GGMLQuantizationType.Q6_K: "q6_k",
    GGMLQuantizationType.MXFP4: "mxfp4",
}
GGUF_MAGIC = b"GGUF"


class GGUFFile:
    """Metadata and tensors of one GGUF file; tensor data stays memory-mapped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFormatError(
                f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')"
            )
        try:
            self.reader = GGUFReader(self.path, "r")
        except Exception as err:  # the reader raises bare ValueErrors from numpy on short files
            raise ModelFormatError(f"{self.path}: truncated or corrupt GGUF file ({err})") from None
        size = self.path.stat().st_size
        self.tensors = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ModelFormatError(
                    f"{self.path}: truncated GGUF file (tensor {t.name} runs past the end)"
                )
        # A tensor's size follows from its block type and shape; a wrong type in the header
        # makes it overlap the next tensor's data.
        ordered = sorted(self.reader.tensors, key=lambda t: t.data_offset)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if a.data_offset + a.n_bytes > b.data_offset:
                raise ModelFormatError(
                    f"{self.path}: corrupt GGUF file (tensor {a.name}, of type "
                    f"{a.tensor_type.name} and shape {list(reversed(a.shape.tolist()))}, "
                    f"overlaps tensor {b.name}: its type does not match its size)"
                )

    def meta(self, key: str, default: Any = ...) -> Any:
        """Metadata `key` (str, number, bool or list); missing and no default is an error."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ModelFormatError(f"{self.path}: metadata key {key} is missing")
            return default
        return field.contents()

    def drop_metadata(self) -> None:
        """Free the parsed metadata (the reader keeps every vocabulary entry as its own arrays);
        tensors stay readable, `meta` no longer is."""
        self.reader.fields.clear()

    def drop_pages(self) -> None:
        """Unmap this process's resident pages of the file (they stay in the page cache, and
        come back on the next read). Once packing has copied the quantized matrices into
        their kernel layouts, the file's own pages would count a second time against the
        process's memory."""
        mapped = getattr(self.reader.data, "_mmap", None)
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def locate(self, view: np.ndarray) -> int:
        """The file offset of an array returned by `tensor` (or a contiguous part of it)."""
        base = self.reader.data.__array_interface__["data"][0]
        offset = view.__array_interface__["data"][0] - base
        if not 0 <= offset <= self.reader.data.nbytes - view.nbytes:
            raise ValueError("locate: the array is not a view of this file")
        return offset

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, str]:
        """The raw data of tensor `name` and its kind.

        `shape` is in row-major order (outermost first, the reverse of GGUF's ne[]); float
        tensors come back with that shape, quantized ones as uint8 [rows..., row_bytes].
        """
        t = self.tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: tensor {name} is missing")
        kind = KINDS.get(t.tensor_type)
        if kind is None:
            raise ModelFormatError(
                f"{self.path}: tensor {name} has block type {t.tensor_type.name}, "
                "which mer does not support"
            )
        actual = tuple(int(d) for d in reversed(t.shape))
        if shape is not None and actual != tuple(shape):
            raise ModelFormatError(
                f"{self.path}: tensor {name} has shape {list(actual)}, expected {list(shape)}"
            )
        data = t.data
        if kind == "bf16":
            data = data.view(np.uint16)
        if kind in ("f32", "f16", "bf16"):
            return data.reshape(actual), kind
        return data.reshape(*actual[:-1], -1), kind
