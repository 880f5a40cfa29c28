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
    """Copy src to dst with metadata values replaced by `meta` and each tensor passed through
    `tensors(name, raw data, type)`, which yields the (name, data, type) triples to write."""
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
