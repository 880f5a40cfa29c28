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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mer.errors import ModelFormatError
from mer.kernels.matmul import PackedWeight
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


def read_planes(layout: dict, buf: np.ndarray, base: int = 0) -> PackedWeight:
    """A PackedWeight whose planes are views of the uint8 array `buf` (offsets minus `base`)."""
    planes = []
    for spec in layout["planes"]:
        dtype = np.dtype(spec["dtype"])
        count = math.prod(spec["shape"])
        at = spec["offset"] - base
        raw = buf[at : at + count * dtype.itemsize]
        planes.append(raw.view(dtype).reshape(spec["shape"]))
    return PackedWeight(layout["kind"], int(layout["rows"]), int(layout["cols"]), tuple(planes))


def args_to_json(args: ModelArgs) -> dict[str, Any]:
    return asdict(args)


def args_from_json(config: dict[str, Any], source: Path) -> ModelArgs:
    try:
        rope = dict(config["rope"])
        if rope.get("freq_factors") is not None:
            rope["freq_factors"] = tuple(float(f) for f in rope["freq_factors"])
        return ModelArgs(**{**config, "rope": RopeArgs(**rope)})
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFormatError(f"{source}: bad model config in the manifest ({err})") from None


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
    return data


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()
