"""Lazy, zero-copy access to the tensors of a Hugging Face model directory.

The header of each safetensors file is read and checked with the safetensors library's own
parser (`safe_open`), which also rejects truncated files. Tensor bytes are then exposed as
read-only `np.memmap` views: nothing is read until a kernel touches it, shards are never
loaded whole, and BF16 (which NumPy cannot represent, so the library's NumPy backend refuses
it) is served as raw uint16 bits that the bf16 kernels understand.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from mer.errors import ModelFormatError

# safetensors dtype -> (numpy dtype of the raw view, mer kind)
_DTYPES: dict[str, tuple[np.dtype, str]] = {
    "F32": (np.dtype("<f4"), "f32"),
    "F16": (np.dtype("<f2"), "f16"),
    "BF16": (np.dtype("<u2"), "bf16"),
}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live."""

    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offset_bytes: int  # absolute offset in the file
    nbytes: int


class SafetensorsDir:
    """All tensors of a model directory (one file, or shards listed in an index)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._refs: dict[str, TensorRef] = {}
        self._maps: dict[Path, np.memmap] = {}
        for file in self._shard_files():
            self._index_file(file)

    def _shard_files(self) -> list[Path]:
        index = self.root / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ModelFormatError(f"{index}: not a valid safetensors index ({err})") from None
            files = sorted({self.root / name for name in weight_map.values()})
            for file in files:
                if not file.exists():
                    raise ModelFormatError(f"{file}: shard listed in {index.name} is missing")
            return files
        files = sorted(self.root.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"{self.root}: no *.safetensors files found")
        return files

    def _index_file(self, file: Path) -> None:
        try:
            # The library validates the header and that the file holds every byte it names.
            with safe_open(str(file), framework="numpy") as handle:
                names = list(handle.keys())
        except Exception as err:  # the library raises its own error types
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelFormatError(f"{file}: unreadable safetensors file ({reason})") from None
        with open(file, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        data_start = 8 + header_len
        file_size = file.stat().st_size
        for name in names:
            entry = header[name]
            begin, end = entry["data_offsets"]
            if data_start + end > file_size:
                raise ModelFormatError(f"{file}: tensor {name} runs past the end of the file")
            self._refs[name] = TensorRef(
                file=file,
                dtype=entry["dtype"],
                shape=tuple(entry["shape"]),
                offset_bytes=data_start + begin,
                nbytes=end - begin,
            )

    def names(self) -> list[str]:
        return list(self._refs)

    def has(self, name: str) -> bool:
        return name in self._refs

    def ref(self, name: str) -> TensorRef:
        try:
            return self._refs[name]
        except KeyError:
            raise ModelFormatError(f"{self.root}: tensor {name} is missing") from None

    def locate(self, view: np.ndarray) -> tuple[Path, int]:
        """The file and byte offset of an array returned by `get` (or a contiguous part of it)."""
        address = view.__array_interface__["data"][0]
        for file, mm in self._maps.items():
            base = mm.__array_interface__["data"][0]
            if base <= address and address + view.nbytes <= base + mm.nbytes:
                return file, address - base
        raise ValueError("locate: the array is not a view of this directory's files")

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, str]:
        """A read-only view of tensor `name` and its kind ("f32" | "f16" | "bf16").

        With `shape`, a mismatch is an error naming the tensor and both shapes.
        """
        return self._view(name, shape, _DTYPES)

    def get_bytes(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A read-only uint8 view of tensor `name`, which must be stored as U8 (packed
        quantized weights, e.g. MXFP4 blocks and their exponents)."""
        return self._view(name, shape, {"U8": (np.dtype(np.uint8), "u8")})[0]

    def _view(self, name: str, shape, dtypes) -> tuple[np.ndarray, str]:
        ref = self.ref(name)
        if ref.dtype not in dtypes:
            raise ModelFormatError(f"{ref.file}: tensor {name} has unsupported dtype {ref.dtype}")
        if shape is not None and tuple(shape) != ref.shape:
            raise ModelFormatError(
                f"{ref.file}: tensor {name} has shape {list(ref.shape)}, expected {list(shape)}"
            )
        np_dtype, kind = dtypes[ref.dtype]
        mm = self._maps.get(ref.file)
        if mm is None:
            mm = np.memmap(ref.file, dtype=np.uint8, mode="r")
            self._maps[ref.file] = mm
        count = int(np.prod(ref.shape)) if ref.shape else 1
        if count * np_dtype.itemsize != ref.nbytes:
            raise ModelFormatError(f"{ref.file}: tensor {name} size does not match its shape")
        raw = mm[ref.offset_bytes : ref.offset_bytes + ref.nbytes]
        return raw.view(np_dtype).reshape(ref.shape), kind
