"""`mer convert SRC DST`: a Hugging Face directory or a GGUF file -> a mer store.

Experts are converted one at a time (read, repacked into the kernels' layout, optionally
re-quantized, checksummed, written), so a model far larger than RAM converts in bounded
memory. See `mer.store.format` for the layout.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import xxhash

from mer.errors import MerError, ModelFormatError, os_error_text
from mer.io.arena import ALIGN, round_up
from mer.kernels.matmul import PackedWeight, packing, requantize
from mer.kernels.matmul import activations as packing_mode
from mer.model import DEFAULT_ACTIVATIONS, open_model_files
from mer.models.args import ModelArgs
from mer.models.hf import QUANT_KINDS
from mer.models.weights import ExpertSpec, ExpertWeights, MatrixSpec, ModelWeights
from mer.store import format as fmt
from mer.store import staging
from mer.tokenizer import Tokenizer


class _Bytes:
    """Memory maps of the source files, one per file."""

    def __init__(self) -> None:
        self._maps: dict[Path, np.memmap] = {}

    def expert(self, spec: ExpertSpec) -> ExpertWeights:
        return ExpertWeights(*(self.matrix(m) for m in spec))

    def matrix(self, m: MatrixSpec) -> PackedWeight:
        mm = self._maps.get(m.file)
        if mm is None:
            mm = self._maps[m.file] = np.memmap(m.file, dtype=np.uint8, mode="r")
        return m.pack(mm[m.offset : m.offset + m.nbytes])


def dense_tensors(weights: ModelWeights) -> Iterator[tuple[str, PackedWeight | np.ndarray]]:
    """Every non-expert weight with its name in the store."""
    yield "embed", weights.embed.raw
    yield "norm", weights.norm
    yield "lm_head", weights.lm_head
    for i, layer in enumerate(weights.layers):
        p = f"layers.{i}."
        for name in (
            "attn_norm",
            "wq",
            "wk",
            "wv",
            "wo",
            "ffn_norm",
            "router",
            "router_bias",
            "shared_gate",
            "q_norm",
            "k_norm",
            "bq",
            "bk",
            "bv",
            "bo",
            "sinks",
            "router_logit_bias",
        ):
            value = getattr(layer, name)
            if value is not None:
                yield p + name, value
        if layer.mla is not None:
            for name in ("wq_a", "q_a_norm", "wkv_a", "kv_a_norm"):
                value = getattr(layer.mla, name)
                if value is not None:
                    yield p + name, value
            for h, w in enumerate(layer.mla.w_kb):
                yield f"{p}w_kb.{h}", w
            for h, w in enumerate(layer.mla.w_vb):
                yield f"{p}w_vb.{h}", w
        if layer.shared is not None:
            for part in ("gate", "up", "down"):
                yield f"{p}shared.{part}", getattr(layer.shared, part)
        if layer.expert_biases is not None:
            for part in ("gate", "up", "down"):
                yield f"{p}expert_bias.{part}", getattr(layer.expert_biases, part)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    quant: str | None = None,
    force: bool = False,
    progress: bool = False,
    trace: str | os.PathLike[str] | None = None,
    activations: str | None = None,
) -> dict:
    """Write the store for model `src` into directory `dst`; returns its manifest.

    quant: "q8_0" or "q4_0" re-quantizes every expert matrix that is not already of that type.
    force: replace an existing store (or what an interrupted conversion left) at `dst`.
    progress: show a progress bar on stderr. trace: a routing trace of this model (`mer
    trace record`): each layer's experts are laid out so that experts used together lie
    together (`mer.cache.trace.co_use_order`), else in id order. The store is written
    beside `dst` and swapped in complete (`mer.store.staging`): an interrupted conversion
    leaves `dst` as it was. activations: the mode the store's weights are packed for ("q8",
    the default: the block types with integer kernels row-interleaved for them, so that
    streamed experts need no repacking; "f32": float activations).
    """
    src, dst = Path(src), Path(dst)
    if quant is not None and quant not in QUANT_KINDS:
        raise ModelFormatError(f"--quant {quant!r}: choose one of {', '.join(QUANT_KINDS)}")
    if fmt.is_store(src):
        raise ModelFormatError(f"{src}: already a mer store")
    _check_destination(dst, force)
    activations = activations or DEFAULT_ACTIVATIONS
    args, weights, tokenizer, _ = open_model_files(src, stream=True, activations=activations)
    orders = None if trace is None else _layout_orders(Path(trace), args)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging.sweep(dst)
    work = staging.staging_dir(dst)
    work.mkdir()
    try:
        (work / fmt.CONVERTING).write_text(f"converting {src.name} into {dst.name}\n")
        try:
            with packing(activations):  # re-quantized matrices too
                manifest = _write_store(
                    src, work, args, weights, tokenizer, quant, progress, orders
                )
        except OSError as err:
            raise MerError(f"cannot write the store {dst}: {os_error_text(err)}") from None
        (work / fmt.CONVERTING).unlink()
        staging.swap_in(work, dst)
        return manifest
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _layout_orders(path: Path, args: ModelArgs) -> list[list[int]]:
    """Each layer's expert order from the routing trace in `path`, which must be this
    model's."""
    from mer.cache.trace import RoutingTrace, co_use_order

    trace = RoutingTrace.load(path)
    if (trace.n_layers, trace.n_experts) != (args.n_layers, args.n_experts):
        raise MerError(
            f"{path}: a trace of {trace.n_layers} layers x {trace.n_experts} experts, "
            f"the model has {args.n_layers} x {args.n_experts}"
        )
    return [[] if args.is_dense_layer(i) else co_use_order(trace, i) for i in range(args.n_layers)]


def _check_destination(dst: Path, force: bool) -> None:
    """Refuse to write over anything but an empty directory, or with `force` a store or what
    an interrupted conversion left."""
    for parent in dst.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ModelFormatError(f"{parent}: a file is in the way of {dst}")
            break
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ModelFormatError(f"{dst}: a file is in the way (choose a directory for the store)")
    if fmt.is_store(dst):
        if not force:
            raise ModelFormatError(f"{dst}: already holds a mer store (use --force to replace it)")
    elif fmt.is_unfinished_store(dst):
        if not force:
            raise ModelFormatError(
                f"{dst}: an unfinished mer store left by an interrupted conversion "
                "(use --force to replace it)"
            )
    elif any(dst.iterdir()):
        raise ModelFormatError(
            f"{dst}: exists, is not empty and is not a mer store (choose another directory)"
        )


def _write_store(
    src: Path,
    dst: Path,
    args: ModelArgs,
    weights: ModelWeights,
    tokenizer: Tokenizer | None,
    quant: str | None,
    progress: bool,
    orders: list[list[int]] | None = None,
) -> dict:
    """Write a complete store into the (empty) directory `dst`; the manifest last. Each
    layer's experts are written in `orders[layer]` (default: by id)."""
    source = _Bytes()
    specs = [
        (i, e, layer.experts[e])
        for i, layer in enumerate(weights.layers)
        for e in (orders[i] if orders else range(len(layer.experts)))
    ]
    total = sum(m.nbytes for _, _, spec in specs for m in spec)
    entries, layouts = [], []
    layout_ids: dict[str, int] = {}
    with _progress(progress) as bar:
        task = bar.add_task(f"experts of {src.name}", total=total)
        with open(dst / fmt.EXPERTS_FILE, "wb") as out:
            at = 0
            for layer, e, spec in specs:
                expert = source.expert(spec)
                mats = [requantize(w, quant) for w in (expert.gate, expert.up, expert.down)]
                parts, end = [], 0
                for w in mats:
                    part, end = fmt.plane_layout(w, end)
                    parts.append(part)
                blob = bytearray(round_up(end, ALIGN))
                for w, part in zip(mats, parts, strict=True):
                    fmt.write_planes(w, part, blob, 0)
                out.write(blob)
                key = json.dumps(parts, sort_keys=True)
                if key not in layout_ids:
                    layout_ids[key] = len(layouts)
                    layouts.append(parts)
                entries.append(
                    {
                        "layer": layer,
                        "expert": e,
                        "offset": at,
                        "length": end,
                        "kinds": [w.kind for w in mats],
                        "layout": layout_ids[key],
                        "xxh3": f"{xxhash.xxh3_64_intdigest(memoryview(blob)[:end]):016x}",
                    }
                )
                at += len(blob)
                bar.advance(task, sum(m.nbytes for m in spec))
            out.flush()
            os.fsync(out.fileno())
        dense = _write_dense(_shared_quantized(weights, quant), dst / fmt.DENSE_FILE)
    tokenizer_files = _write_tokenizer(src, tokenizer, dst)
    manifest = {
        "format": fmt.FORMAT,
        "version": fmt.VERSION,
        "source": src.name,
        "quant": quant,
        "activations": packing_mode(),
        "layout": "co-use" if orders else "id",
        "config": fmt.args_to_json(args),
        "experts": {
            "file": fmt.EXPERTS_FILE,
            "bytes": at,
            "align": ALIGN,
            "layouts": layouts,
            "entries": entries,
        },
        "dense": {"file": fmt.DENSE_FILE, **dense},
        "tokenizer": tokenizer_files,
    }
    with open(dst / fmt.MANIFEST, "w") as out:
        out.write(json.dumps(manifest, indent=1))
        out.flush()
        os.fsync(out.fileno())
    return manifest


def _shared_quantized(weights: ModelWeights, quant: str | None) -> ModelWeights:
    """The weights with each layer's shared FFN quantized like the experts."""
    layers = []
    for layer in weights.layers:
        if layer.shared is not None:
            shared = ExpertWeights(*(requantize(w, quant) for w in layer.shared.parts))
            layer = replace(layer, shared=shared)
        layers.append(layer)
    return replace(weights, layers=layers)


def _write_dense(weights: ModelWeights, path: Path) -> dict:
    tensors: dict[str, dict] = {}
    at = 0
    items = list(dense_tensors(weights))
    for name, value in items:
        if isinstance(value, PackedWeight):
            tensors[name], at = fmt.plane_layout(value, at)
        else:
            at = fmt.align(at)
            tensors[name] = {
                "array": {"offset": at, "dtype": value.dtype.str, "shape": list(value.shape)}
            }
            at += value.nbytes
    tensors["embed"]["kind"] = weights.embed.kind
    buf = bytearray(at)
    for name, value in items:
        if isinstance(value, PackedWeight):
            fmt.write_planes(value, tensors[name], buf, 0)
        else:
            spec = tensors[name]["array"]
            flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            buf[spec["offset"] : spec["offset"] + flat.nbytes] = flat.data
    with open(path, "wb") as out:
        out.write(buf)
        out.flush()
        os.fsync(out.fileno())
    return {"bytes": at, "xxh3": f"{xxhash.xxh3_64_intdigest(buf):016x}", "tensors": tensors}


def _write_tokenizer(src: Path, tok: Tokenizer | None, dst: Path) -> list[str]:
    """Copy a Hugging Face directory's tokenizer files, or write them for a GGUF vocabulary."""
    if tok is None:
        return []
    written = []
    if src.is_dir():
        for name in fmt.TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
                written.append(name)
    else:
        (dst / "tokenizer.json").write_text(tok.backend_json())
        config = {
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "chat_template": tok.chat_template,
        }
        (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        written += ["tokenizer.json", "tokenizer_config.json"]
    # End-of-sequence ids may come from config.json, which a store does not copy.
    gen_path = dst / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen["eos_token_id"] = sorted(tok.eos_token_ids)
    if tok.bos_token_id is not None:
        gen["bos_token_id"] = tok.bos_token_id
    gen_path.write_text(json.dumps(gen, indent=1))
    if "generation_config.json" not in written:
        written.append("generation_config.json")
    return written
