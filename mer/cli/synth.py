"""`mer synth`: write a synthetic Mixtral-family model (mer.synth) as GGUF, optionally also as
a store, and show how it routes."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from mer.cli.common import FlagError, finite, whole
from mer.errors import MerError, os_error_text


def add_synth(sub: argparse._SubParsersAction) -> None:
    from mer.synth import QUANTS, SHAPES

    p = sub.add_parser(
        "synth",
        help="write a synthetic Mixture-of-Experts model (GGUF, llama.cpp-loadable) of any shape",
        description="Random weights at realistic scales, the bundled model's vocabulary, and "
        "routing with tunable popularity (--skew) and temporal locality (--stickiness).",
    )
    p.add_argument("out", help="the GGUF file to write")
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="mixtral-8x7b",
        help="a preset that the flags below override",
    )
    for name in ("layers", "experts", "top-k", "dim", "ffn", "heads", "kv-heads", "context"):
        p.add_argument(f"--{name}", type=whole(1), help=f"{name} (default: the shape's)")
    p.add_argument("--quant", choices=sorted(QUANTS), default="q4_0", help="block types")
    p.add_argument("--skew", type=finite, default=0.3, help="expert popularity (0 = uniform)")
    p.add_argument(
        "--stickiness", type=finite, default=0.3, help="temporal locality in [0, 0.95] (0 = none)"
    )
    p.add_argument("--seed", type=whole(0), default=0, help="random seed")
    p.add_argument("--store", help="also convert the model into a mer store in this directory")
    p.add_argument("--force", action="store_true", help="replace OUT (and --store) if present")
    p.add_argument(
        "--histogram-tokens",
        type=whole(0),
        default=256,
        help="tokens of text to route for the histogram (0 = skip)",
    )
    p.set_defaults(run=run_synth)


def run_synth(opts: argparse.Namespace) -> int:
    from mer.models.sources import resolve_model
    from mer.synth import SHAPES, Knobs, synth_size, write_gguf

    shape = SHAPES[opts.shape]
    overrides = {
        field: getattr(opts, field)
        for field in ("layers", "experts", "top_k", "dim", "ffn", "heads", "kv_heads", "context")
        if getattr(opts, field) is not None
    }
    try:
        shape = replace(shape, **overrides)
        knobs = Knobs(opts.skew, opts.stickiness, opts.seed)
    except MerError as err:
        raise FlagError(str(err)) from None
    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise FlagError(f"{out}: exists (use --force to replace it)")
    if out.is_dir():
        raise FlagError(f"{out}: is a directory (give a file name)")
    vocabulary = resolve_model(None)
    size = synth_size(shape, opts.quant, vocabulary)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if size > free:
        raise MerError(
            f"{out.parent}: {size / 2**30:.1f} GiB are needed and {free / 2**30:.1f} GiB are free"
        )
    partial = out.with_name(f".{out.name}.partial.{os.getpid()}")
    start = time.perf_counter()
    try:
        with _progress(sys.stderr.isatty(), size, out.name) as advance:
            write_gguf(partial, shape, opts.quant, knobs, vocabulary, advance)
        os.replace(partial, out)
    except OSError as err:
        raise MerError(f"cannot write {out}: {os_error_text(err)}") from None
    finally:
        partial.unlink(missing_ok=True)
    print(
        f"{out}: {shape.layers} layers x {shape.experts} experts (top-{shape.top_k}), "
        f"{size / 2**30:.2f} GiB of {opts.quant} in {time.perf_counter() - start:.0f} s"
    )
    model_path = out
    if opts.store:
        from mer.store.convert import convert

        start = time.perf_counter()
        convert(out, opts.store, force=opts.force, progress=sys.stderr.isatty())
        print(f"{opts.store}: the store, in {time.perf_counter() - start:.0f} s")
        model_path = Path(opts.store)
    if opts.histogram_tokens:
        _show_routing(model_path, size, opts.histogram_tokens)
    return 0


def _show_routing(path: Path, size: int, tokens: int) -> None:
    import mer
    from mer.synth import measure_routing

    # A model larger than a few GiB is streamed: the histogram must not need its size in RAM.
    cache = min(size, 2 << 30) if size > 4 << 30 else None
    with mer.load_model(path, cache_bytes=cache) as model:
        stats = measure_routing(model, tokens)
    k, e = model.args.n_experts_per_tok, model.args.n_experts
    print(
        f"routing over {int(stats.tokens.max())} tokens of text: percent of tokens choosing each "
        f"expert per layer (uniform: {100 * k / e:.0f}), and how often a token's first choice "
        f"is the previous token's (random: {100 / e:.0f}%; all layers: "
        f"{stats.repeat_rate():.0%})"
    )
    print(stats.table())


class _progress:
    """A byte-count progress bar on stderr (when it is a terminal)."""

    def __init__(self, enabled: bool, total: int, name: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        self._bar = Progress(
            "{task.description}",
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self._task = self._bar.add_task(name, total=total)

    def __enter__(self):
        self._bar.__enter__()
        return lambda n: self._bar.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)
