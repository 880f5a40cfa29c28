"""Open a mer store: checks the manifest against the files, then serves dense weights from a
memory map and experts either resident (views of a memory map, checksums verified at load)
or through the streaming cache (`StoreExperts`, checksums verified on read)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xxhash

from mer.cache.sources import ExpertKey, Segment
from mer.errors import ModelFormatError
from mer.io.arena import ALIGN, round_up
from mer.kernels.matmul import PackedWeight
from mer.models.args import ModelArgs
from mer.models.weights import Embedding, ExpertWeights, LayerWeights, ModelWeights
from mer.store import format as fmt
from mer.tokenizer import Tokenizer


class StoreExperts:
    """The experts of a store as a streaming source: one checksummed read per expert, and
    weights that are zero-copy views of the slot."""

    zero_copy = True  # decode() only makes views: they stay valid while the slot holds the blob

    def __init__(self, root: Path, manifest: dict, args: ModelArgs) -> None:
        table = manifest["experts"]
        path = root / table["file"]
        self.files = [path]
        self.n_layers = args.n_layers
        self.n_experts = args.n_experts
        self._layouts = table["layouts"]
        self._entries: dict[ExpertKey, dict] = {}
        try:
            size = path.stat().st_size
        except OSError as err:
            raise ModelFormatError(f"{path}: cannot open ({err.strerror})") from None
        for entry in table["entries"]:
            try:
                key = (int(entry["layer"]), int(entry["expert"]))
                offset, length = int(entry["offset"]), int(entry["length"])
                layout = self._layouts[int(entry["layout"])]
                int(entry["xxh3"], 16)
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise ModelFormatError(f"{root / fmt.MANIFEST}: bad expert entry ({err})") from None
            if offset % ALIGN or length <= 0 or len(layout) != 3:
                raise ModelFormatError(f"{root / fmt.MANIFEST}: bad expert entry {key}")
            if offset + length > size:
                raise ModelFormatError(
                    f"{path}: truncated store file (expert {key} ends at byte "
                    f"{offset + length}, the file has {size})"
                )
            self._entries[key] = entry
        for layer in range(args.n_layers):
            for e in range(args.n_experts):
                if (layer, e) not in self._entries:
                    raise ModelFormatError(
                        f"{root / fmt.MANIFEST}: no entry for expert {e} of layer {layer}"
                    )
        self.slot_bytes = round_up(max(int(e["length"]) for e in self._entries.values()))

    def segments(self, key: ExpertKey) -> Sequence[Segment]:
        entry = self._entries[key]
        return (Segment(0, int(entry["offset"]), int(entry["length"]), 0, int(entry["xxh3"], 16)),)

    def decode(self, key: ExpertKey, slot: np.ndarray) -> ExpertWeights:
        layout = self._layouts[int(self._entries[key]["layout"])]
        return ExpertWeights(*(fmt.read_planes(part, slot) for part in layout))

    def resident(self, verify: bool) -> list[list[ExpertWeights]]:
        """Every expert as views of a memory map of the experts file, checked when `verify`."""
        mm = np.memmap(self.files[0], dtype=np.uint8, mode="r")
        layers: list[list[ExpertWeights]] = [[] for _ in range(self.n_layers)]
        for layer in range(self.n_layers):
            for e in range(self.n_experts):
                (seg,) = self.segments((layer, e))
                blob = mm[seg.offset : seg.offset + seg.length]
                if verify and xxhash.xxh3_64_intdigest(blob) != seg.expected:
                    raise ModelFormatError(
                        f"{self.files[0]}: checksum mismatch in expert {e} of layer {layer} "
                        f"(bytes {seg.offset}..{seg.offset + seg.length}): the store is corrupt"
                    )
                layers[layer].append(self.decode((layer, e), blob))
        return layers


def load_store(
    root: Path, *, stream: bool = False, verify: bool = True
) -> tuple[ModelArgs, ModelWeights, Tokenizer | None, StoreExperts]:
    """Args, weights, tokenizer and expert source of the store in `root`. Experts are loaded
    into the weights unless `stream`; then the layers list none and the source serves them."""
    manifest = fmt.read_manifest(root)
    try:
        args = fmt.args_from_json(manifest["config"], root / fmt.MANIFEST)
        dense_info = manifest["dense"]
        manifest["experts"]["entries"]
    except (KeyError, TypeError) as err:
        raise ModelFormatError(f"{root / fmt.MANIFEST}: missing section {err}") from None
    experts = StoreExperts(root, manifest, args)
    dense = _map_dense(root, dense_info, verify)
    weights = _dense_weights(root, args, dense_info["tensors"], dense, experts, stream, verify)
    tokenizer = Tokenizer.from_hf_dir(root) if (root / "tokenizer.json").is_file() else None
    return args, weights, tokenizer, experts


def _map_dense(root: Path, info: dict, verify: bool) -> np.ndarray:
    path = root / info["file"]
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ModelFormatError(f"{path}: cannot open ({err.strerror})") from None
    if size < int(info["bytes"]):
        raise ModelFormatError(
            f"{path}: truncated store file ({size} bytes, the manifest says {info['bytes']})"
        )
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    if verify and xxhash.xxh3_64_intdigest(mm[: int(info["bytes"])]) != int(info["xxh3"], 16):
        raise ModelFormatError(f"{path}: checksum mismatch: the store is corrupt")
    return mm


def _dense_weights(
    root: Path,
    args: ModelArgs,
    tensors: dict,
    mm: np.ndarray,
    experts: StoreExperts,
    stream: bool,
    verify: bool,
) -> ModelWeights:
    def get(name: str) -> dict:
        if name not in tensors:
            raise ModelFormatError(f"{root / fmt.MANIFEST}: dense tensor {name} is missing")
        return tensors[name]

    def matrix(name: str) -> PackedWeight:
        return fmt.read_planes(get(name), mm)

    def array(name: str) -> np.ndarray:
        spec = get(name)["array"]
        dtype = np.dtype(spec["dtype"])
        count = math.prod(spec["shape"])
        raw = mm[spec["offset"] : spec["offset"] + count * dtype.itemsize]
        return raw.view(dtype).reshape(spec["shape"])

    resident = None if stream else experts.resident(verify)
    layers = []
    for i in range(args.n_layers):
        p = f"layers.{i}."
        layers.append(
            LayerWeights(
                attn_norm=array(p + "attn_norm"),
                wq=matrix(p + "wq"),
                wk=matrix(p + "wk"),
                wv=matrix(p + "wv"),
                wo=matrix(p + "wo"),
                ffn_norm=array(p + "ffn_norm"),
                router=array(p + "router") if args.is_moe else None,
                experts=() if resident is None else resident[i],
            )
        )
    return ModelWeights(
        embed=Embedding(array("embed"), get("embed")["kind"], args.vocab_size, args.dim),
        layers=layers,
        norm=array("norm"),
        lm_head=matrix("lm_head"),
    )
