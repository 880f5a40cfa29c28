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
from mer.kernels.matmul import PackedWeight, row_bytes
from mer.models.args import ModelArgs
from mer.models.weights import (
    Embedding,
    ExpertBiases,
    ExpertWeights,
    LayerWeights,
    MLAWeights,
    ModelWeights,
)
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
        ends = [max(fmt.layout_end(m) for m in layout) for layout in self._layouts]
        for entry in table["entries"]:  # types checked with the manifest
            key = (entry["layer"], entry["expert"])
            offset, length = entry["offset"], entry["length"]
            if offset % ALIGN or length <= 0 or ends[entry["layout"]] > length:
                raise ModelFormatError(f"{root / fmt.MANIFEST}: bad expert entry {key}")
            if offset + length > size:
                raise ModelFormatError(
                    f"{path}: truncated store file (expert {key} ends at byte "
                    f"{offset + length}, the file has {size})"
                )
            self._entries[key] = entry
        for layer in range(args.n_layers):
            for e in range(0 if args.is_dense_layer(layer) else args.n_experts):
                if (layer, e) not in self._entries:
                    raise ModelFormatError(
                        f"{root / fmt.MANIFEST}: no entry for expert {e} of layer {layer}"
                    )
        self.slot_bytes = round_up(max(int(e["length"]) for e in self._entries.values()))

    def keys(self) -> Sequence[ExpertKey]:
        return list(self._entries)

    def segments(self, key: ExpertKey) -> Sequence[Segment]:
        entry = self._entries[key]
        return (Segment(0, int(entry["offset"]), int(entry["length"]), 0, int(entry["xxh3"], 16)),)

    def kinds(self, key: ExpertKey) -> tuple[str, str, str]:
        gate, up, down = (m["kind"] for m in self._layouts[self._entries[key]["layout"]])
        return gate, up, down

    def decode(self, key: ExpertKey, slot: np.ndarray) -> ExpertWeights:
        layout = self._layouts[int(self._entries[key]["layout"])]
        return ExpertWeights(*(fmt.read_planes(part, slot) for part in layout))

    def resident(self, verify: bool) -> list[list[ExpertWeights]]:
        """Every expert as views of a memory map of the experts file, checked when `verify`."""
        mm = np.memmap(self.files[0], dtype=np.uint8, mode="r")
        layers: list[list[ExpertWeights]] = [[] for _ in range(self.n_layers)]
        for layer, e in sorted(self._entries):
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
    root: Path, *, stream: bool = False, verify: bool = True, activations: str | None = None
) -> tuple[ModelArgs, ModelWeights, Tokenizer | None, StoreExperts]:
    """Args, weights, tokenizer and expert source of the store in `root`. Experts are loaded
    into the weights unless `stream`; then the layers list none and the source serves them.
    `activations`, when given, must be the mode the store was converted in: its weights are
    read in place, in the layout of that mode (ModelFormatError otherwise)."""
    manifest = fmt.read_manifest(root)  # its structure and types checked
    made = fmt.store_activations(manifest)
    if activations is not None and activations != made:
        raise ModelFormatError(
            f"{root}: this store was converted for {made} activations; convert the model "
            f"again with `mer convert --activations {activations}`, or load the store as it is"
        )
    args = fmt.args_from_json(manifest["config"], root / fmt.MANIFEST)
    dense_info = manifest["dense"]
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
    manifest = root / fmt.MANIFEST

    def get(name: str, array: bool) -> dict:
        spec = tensors.get(name)
        if spec is None:
            raise ModelFormatError(f"{manifest}: dense tensor {name} is missing")
        if ("array" in spec) != array:
            what = "an array" if array else "a matrix"
            raise ModelFormatError(f"{manifest}: dense tensor {name} should be {what}")
        return spec

    def matrix(name: str, rows: int, cols: int) -> PackedWeight:
        spec = get(name, array=False)
        if (spec["rows"], spec["cols"]) != (rows, cols):
            raise ModelFormatError(
                f"{manifest}: dense tensor {name} is [{spec['rows']}, {spec['cols']}], "
                f"the config implies [{rows}, {cols}]"
            )
        try:
            return fmt.read_planes(spec, mm)
        except ModelFormatError as err:
            raise ModelFormatError(f"{mm_path}: dense tensor {name}: {err}") from None

    def array(name: str, *shape: int | None) -> np.ndarray:
        """A float array of `shape` (None: any length there)."""
        spec = get(name, array=True)["array"]
        dtype = np.dtype(spec["dtype"])
        got = spec["shape"]
        if len(got) != len(shape) or any(
            w not in (None, g) for g, w in zip(got, shape, strict=True)
        ):
            raise ModelFormatError(f"{manifest}: dense tensor {name} has shape {got}")
        end = spec["offset"] + math.prod(got) * dtype.itemsize
        if end > mm.shape[0]:
            raise ModelFormatError(f"{mm_path}: dense tensor {name} runs past the end")
        return mm[spec["offset"] : end].view(dtype).reshape(got)

    def latent(p: str) -> MLAWeights:
        r, rope, q_rank = args.kv_lora_rank, args.head_dim, args.q_lora_rank
        heads = range(args.n_heads)
        return MLAWeights(
            wkv_a=matrix(p + "wkv_a", r + rope, d),
            kv_a_norm=array(p + "kv_a_norm", r),
            w_kb=[matrix(f"{p}w_kb.{h}", r, args.qk_nope_head_dim) for h in heads],
            w_vb=[matrix(f"{p}w_vb.{h}", args.v_head_dim, r) for h in heads],
            wq_a=matrix(p + "wq_a", q_rank, d) if q_rank else None,
            q_a_norm=array(p + "q_a_norm", q_rank) if q_rank else None,
        )

    def shared(p: str, width: int) -> ExpertWeights | None:
        if not width:
            return None
        return ExpertWeights(
            matrix(p + "shared.gate", width, d),
            matrix(p + "shared.up", width, d),
            matrix(p + "shared.down", d, width),
        )

    def expert_biases(p: str) -> ExpertBiases:
        e, i = args.n_experts, args.ffn_dim
        return ExpertBiases(
            array(p + "expert_bias.gate", e, i),
            array(p + "expert_bias.up", e, i),
            array(p + "expert_bias.down", e, d),
            args.swiglu_limit,
        )

    mm_path = root / fmt.DENSE_FILE
    d, q_dim = args.dim, args.n_heads * args.q_head_dim
    kv_dim = args.n_kv_heads * args.head_dim
    resident = None if stream else experts.resident(verify)
    q_len = k_len = args.head_dim
    if args.qk_norm == "full":
        q_len, k_len = q_dim, kv_dim
    layers = []
    for i in range(args.n_layers):
        p = f"layers.{i}."
        routed = args.is_moe and not args.is_dense_layer(i)
        mla = latent(p) if args.mla else None
        layers.append(
            LayerWeights(
                q_norm=array(p + "q_norm", q_len) if args.qk_norm else None,
                k_norm=array(p + "k_norm", k_len) if args.qk_norm else None,
                attn_norm=array(p + "attn_norm", d),
                wq=matrix(p + "wq", q_dim, args.q_lora_rank or d),
                wk=None if mla else matrix(p + "wk", kv_dim, d),
                wv=None if mla else matrix(p + "wv", kv_dim, d),
                wo=matrix(p + "wo", d, args.value_dim),
                ffn_norm=array(p + "ffn_norm", d),
                router=array(p + "router", args.n_experts, d) if routed else None,
                router_bias=array(p + "router_bias", args.n_experts)
                if routed and args.router_bias
                else None,
                experts=() if resident is None else resident[i],
                mla=mla,
                shared_gate=array(p + "shared_gate", d) if routed and args.shared_gate else None,
                bq=array(p + "bq", q_dim) if args.qkv_bias else None,
                bk=array(p + "bk", kv_dim) if args.qkv_bias else None,
                bv=array(p + "bv", kv_dim) if args.qkv_bias else None,
                bo=array(p + "bo", d) if args.o_bias else None,
                sinks=array(p + "sinks", args.n_heads) if args.sinks else None,
                router_logit_bias=array(p + "router_logit_bias", args.n_experts)
                if routed and args.router_logit_bias
                else None,
                expert_biases=expert_biases(p) if routed and args.expert_bias else None,
                shared=shared(
                    p, args.dense_ffn_dim if args.is_dense_layer(i) else args.shared_ffn_dim
                ),
            )
        )
    embed = get("embed", array=True)
    kind, raw = embed.get("kind"), array("embed", args.vocab_size, None)
    try:
        size = row_bytes(kind, d)
    except (KeyError, ValueError, TypeError):
        raise ModelFormatError(f"{manifest}: dense tensor embed has no known kind") from None
    if raw.nbytes != args.vocab_size * size:
        raise ModelFormatError(f"{manifest}: dense tensor embed does not hold {kind} rows of {d}")
    return ModelWeights(
        embed=Embedding(raw, kind, args.vocab_size, d),
        layers=layers,
        norm=array("norm", d),
        lm_head=matrix("lm_head", args.vocab_size, d),
    )
