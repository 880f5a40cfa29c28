"""The mer store: a model laid out for streaming experts from an SSD.

A store is a directory:

    manifest.json    format name and version, the model config, and the table of contents
    experts.bin      one blob per expert, each starting at a 4 KiB boundary
    dense.bin        every other weight (attention, norms, router, embeddings, head)
    tokenizer.json, tokenizer_config.json, ... the tokenizer and chat template

An expert's blob holds its gate, up and down matrices one after another in the kernels' own
layout (the `planes` of a PackedWeight), each plane starting at a 64-byte boundary, so a slot
holding the blob is used in place: no copy and no repacking. The manifest lists, for every
expert, its offset, length, per-projection block types, plane layout and the xxh3_64 of its
bytes; dense tensors are listed with their planes' offsets in dense.bin, which is
memory-mapped. The manifest is written last, so an interrupted conversion is not a store.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from mer.errors import ModelFormatError
from mer.kernels.matmul import ACTIVATIONS, PackedWeight, activations_of, plane_specs
from mer.models.args import ModelArgs, RopeArgs

FORMAT = "mer-store"
VERSION = 1
MANIFEST = "manifest.json"
EXPERTS_FILE = "experts.bin"
DENSE_FILE = "dense.bin"
PLANE_ALIGN = 64
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def align(n: int, to: int = PLANE_ALIGN) -> int:
    return -(-n // to) * to


def plane_layout(w: PackedWeight, start: int) -> tuple[dict, int]:
    """The manifest entry for `w` with planes placed from byte `start`; and the end offset."""
    planes, at = [], start
    for p in w.planes:
        at = align(at)
        planes.append({"offset": at, "dtype": p.dtype.str, "shape": list(p.shape)})
        at += p.nbytes
    return {"kind": w.kind, "rows": w.rows, "cols": w.cols, "planes": planes}, at


def write_planes(w: PackedWeight, layout: dict, out: bytearray | memoryview, base: int) -> None:
    """Copy w's planes into `out` at the offsets of `layout`, relative to `base`."""
    for p, spec in zip(w.planes, layout["planes"], strict=True):
        at = spec["offset"] - base
        out[at : at + p.nbytes] = np.ascontiguousarray(p).reshape(-1).view(np.uint8).data


def layout_end(layout: dict) -> int:
    """The byte just past the last plane of a (checked) matrix layout."""
    return max(
        p["offset"] + math.prod(p["shape"]) * np.dtype(p["dtype"]).itemsize
        for p in layout["planes"]
    )


def read_planes(layout: dict, buf: np.ndarray, base: int = 0) -> PackedWeight:
    """A PackedWeight whose planes are views of the uint8 array `buf` (offsets minus `base`).
    The layout must have passed `check_manifest`; `buf` must hold all its planes."""
    if layout_end(layout) - base > buf.shape[0]:
        raise ModelFormatError(
            f"a {layout['kind']} matrix runs past the end of its {buf.shape[0]}-byte block"
        )
    planes = []
    for spec in layout["planes"]:
        dtype = np.dtype(spec["dtype"])
        count = math.prod(spec["shape"])
        at = spec["offset"] - base
        raw = buf[at : at + count * dtype.itemsize]
        planes.append(raw.view(dtype).reshape(spec["shape"]))
    return PackedWeight(layout["kind"], int(layout["rows"]), int(layout["cols"]), tuple(planes))


def store_activations(manifest: dict) -> str:
    """The activations mode a (checked) store's weights were packed for: its manifest's
    "activations", or for stores that predate the field, what their kinds say."""
    if manifest.get("activations") in ACTIVATIONS:
        return manifest["activations"]
    kinds = [m["kind"] for layout in manifest["experts"]["layouts"] for m in layout]
    kinds += [t["kind"] for t in manifest["dense"]["tensors"].values() if "planes" in t]
    return activations_of(kinds)


def args_to_json(args: ModelArgs) -> dict[str, Any]:
    return asdict(args)


_JSON_TYPES = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "int | None": (int, type(None)),
    "str | None": (str, type(None)),
}


def _typed(cls: type, config: Any, source: Path, where: str) -> dict[str, Any]:
    """`config` checked against the annotations of dataclass `cls` (missing keys keep their
    defaults; unknown keys and wrong types are errors)."""
    if not isinstance(config, dict):
        raise ModelFormatError(f"{source}: {where} must be an object")
    known = {f.name: f.type for f in fields(cls)}
    out = {}
    for key, value in config.items():
        if key not in known:
            raise ModelFormatError(f"{source}: {where}.{key} is not a known setting")
        types = _JSON_TYPES.get(str(known[key]))
        if types is not None:
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ModelFormatError(f"{source}: {where}.{key} must be {known[key]}")
            value = float(value) if known[key] == "float" else value
        out[key] = value
    return out


def args_from_json(config: dict[str, Any], source: Path) -> ModelArgs:
    values = _typed(ModelArgs, config, source, "config")
    rope = _typed(RopeArgs, values.get("rope", {}), source, "config.rope")
    factors = rope.get("freq_factors")
    if factors is not None:
        if not isinstance(factors, list) or not all(_is_number(f) for f in factors):
            raise ModelFormatError(f"{source}: config.rope.freq_factors must be numbers")
        rope["freq_factors"] = tuple(float(f) for f in factors)
    full = values.get("full_attention_layers")
    if full is not None:
        if not isinstance(full, list) or not all(_is_count(i) for i in full):
            raise ModelFormatError(f"{source}: config.full_attention_layers must be layer numbers")
        values["full_attention_layers"] = tuple(full)
    try:
        return ModelArgs(**{**values, "rope": RopeArgs(**rope)})
    except TypeError as err:
        raise ModelFormatError(f"{source}: bad model config in the manifest ({err})") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_matrix_layout(layout: Any, source: Path, where: str) -> None:
    """A matrix's layout names a known kind, positive dimensions, and exactly the planes that
    packing such a matrix makes, at non-negative offsets (else the kernels would read out of
    bounds)."""
    if not isinstance(layout, dict):
        raise ModelFormatError(f"{source}: {where} must be an object")
    kind, rows, cols, planes = (layout.get(k) for k in ("kind", "rows", "cols", "planes"))
    if not isinstance(kind, str) or not _is_count(rows) or not _is_count(cols):
        raise ModelFormatError(f"{source}: {where} needs a kind, rows and cols")
    try:
        expected = plane_specs(kind, rows, cols)
    except ValueError as err:
        raise ModelFormatError(f"{source}: {where}: {err}") from None
    if not isinstance(planes, list) or len(planes) != len(expected):
        raise ModelFormatError(f"{source}: {where} must list {len(expected)} planes")
    for plane, (dtype, shape) in zip(planes, expected, strict=True):
        if (
            not isinstance(plane, dict)
            or not _is_count(plane.get("offset"))
            or plane.get("dtype") != dtype
            or plane.get("shape") != list(shape)
        ):
            raise ModelFormatError(
                f"{source}: {where}: its planes do not match a {kind} [{rows}, {cols}] matrix"
            )


def _check_array(spec: Any, source: Path, where: str) -> None:
    try:
        ok = (
            isinstance(spec, dict)
            and _is_count(spec.get("offset"))
            and isinstance(spec.get("shape"), list)
            and all(_is_count(d) for d in spec["shape"])
            and np.dtype(spec.get("dtype")).kind in "fiub"
        )
    except TypeError:
        ok = False
    if not ok:
        raise ModelFormatError(f"{source}: {where} must give an offset, a dtype and a shape")


def check_manifest(data: dict[str, Any], source: Path) -> None:
    """Every section and entry of a manifest has the types and shapes mer relies on."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ModelFormatError(f"{source}: {what}")

    experts, dense = data.get("experts"), data.get("dense")
    need(isinstance(data.get("config"), dict), "config must be an object")
    need(isinstance(experts, dict), "experts must be an object")
    need(isinstance(experts.get("file"), str), "experts.file must be a file name")
    layouts, entries = experts.get("layouts"), experts.get("entries")
    need(isinstance(layouts, list), "experts.layouts must be a list")
    for i, layout in enumerate(layouts):
        need(
            isinstance(layout, list) and len(layout) == 3, f"experts.layouts[{i}] needs 3 matrices"
        )
        for j, matrix in enumerate(layout):
            check_matrix_layout(matrix, source, f"experts.layouts[{i}][{j}]")
    need(isinstance(entries, list), "experts.entries must be a list")
    for i, entry in enumerate(entries):
        where = f"experts.entries[{i}]"
        need(isinstance(entry, dict), f"{where} must be an object")
        for key in ("layer", "expert", "offset", "length", "layout"):
            need(_is_count(entry.get(key)), f"{where}.{key} must be a whole number")
        need(entry["layout"] < len(layouts), f"{where}.layout names no layout")
        kinds = entry.get("kinds")
        need(
            isinstance(kinds, list) and len(kinds) == 3 and all(isinstance(k, str) for k in kinds),
            f"{where}.kinds must be 3 block types",
        )
        try:
            int(entry.get("xxh3"), 16)
        except (TypeError, ValueError):
            need(False, f"{where}.xxh3 must be a hexadecimal checksum")
    need(isinstance(dense, dict), "dense must be an object")
    need(isinstance(dense.get("file"), str), "dense.file must be a file name")
    need(_is_count(dense.get("bytes")), "dense.bytes must be a whole number")
    try:
        int(dense.get("xxh3"), 16)
    except (TypeError, ValueError):
        need(False, "dense.xxh3 must be a hexadecimal checksum")
    tensors = dense.get("tensors")
    need(isinstance(tensors, dict), "dense.tensors must be an object")
    for name, spec in tensors.items():
        if isinstance(spec, dict) and "array" in spec:
            _check_array(spec["array"], source, f"dense.tensors.{name}.array")
        else:
            check_matrix_layout(spec, source, f"dense.tensors.{name}")
    tokenizer = data.get("tokenizer", [])
    need(
        isinstance(tokenizer, list) and all(isinstance(t, str) for t in tokenizer),
        "tokenizer must list file names",
    )


def read_manifest(root: Path) -> dict[str, Any]:
    """The parsed manifest of the store in `root`, with its format and version checked."""
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing (not a mer store)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{path}: unreadable manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelFormatError(f"{path}: not a mer store manifest")
    if data.get("version") != VERSION:
        raise ModelFormatError(
            f"{path}: store format version {data.get('version')} is not supported "
            f"(this mer reads version {VERSION}); convert the model again"
        )
    check_manifest(data, path)
    return data


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


# What a conversion writes before its manifest: their presence without a manifest marks a
# store whose conversion did not finish.
CONVERTING = "CONVERTING"
_PARTS = (CONVERTING, EXPERTS_FILE, EXPERTS_FILE + ".part", DENSE_FILE, DENSE_FILE + ".part")


def is_unfinished_store(path: Path) -> bool:
    """A directory a conversion wrote into but did not finish (no manifest)."""
    return (
        path.is_dir()
        and not (path / MANIFEST).exists()
        and any((path / name).exists() for name in _PARTS)
    )
