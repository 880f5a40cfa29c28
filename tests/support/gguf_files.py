"""Rewrite GGUF files for tests: change metadata, split or replace tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

TensorRewrite = Callable[[str, np.ndarray, gguf.GGMLQuantizationType], Iterable[tuple]]


def keep(name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> Iterable[tuple]:
    yield name, data, qtype


def rewrite(
    src: Path, dst: Path, meta: dict[str, Any] | None = None, tensors: TensorRewrite = keep
) -> Path:
    """Copy src to dst with metadata values replaced (or added) by `meta` and each tensor
    passed through `tensors(name, raw data, type)`, which yields the (name, data, type)
    triples to write. An added key is a uint32, float32, string or array by its value's type."""
    reader = gguf.GGUFReader(src)
    meta = meta or {}
    arch = meta.get("general.architecture", reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value, vtype = meta.get(name, field.contents()), field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, vtype)
    added = {int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32}
    for name, value in meta.items():
        if name in reader.fields:
            continue
        if isinstance(value, list):  # an array, its element type inferred
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, added.get(type(value), gguf.GGUFValueType.STRING))
    for t in reader.tensors:
        for name, data, qtype in tensors(t.name, np.array(t.data), t.tensor_type):
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def split_experts(name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> Iterable[tuple]:
    """Stacked expert tensors -> the older one-tensor-per-expert layout."""
    if "_exps." not in name:
        yield name, data, qtype
        return
    for e in range(data.shape[0]):
        yield name.replace("_exps.weight", f".{e}.weight"), data[e], qtype


def retype(src: Path, dst: Path, name: str, qtype: gguf.GGMLQuantizationType) -> Path:
    """Copy src to dst with the header giving tensor `name` block type `qtype` (its data
    unchanged): a file that still parses, with a type that does not match the tensor's size."""
    reader = gguf.GGUFReader(src)
    (tensor,) = [t for t in reader.tensors if t.name == name]
    # A tensor's header entry: name length, name, dimension count, dimensions, type, offset.
    at = tensor.field.offset + sum(part.nbytes for part in tensor.field.parts[:4])
    data = bytearray(Path(src).read_bytes())
    data[at : at + 4] = int(qtype).to_bytes(4, "little")
    Path(dst).write_bytes(bytes(data))
    return dst
