"""`mer generate`: a prompt's continuation, streamed to the terminal."""

from __future__ import annotations

import argparse
import json
import sys
import time

from mer.cli.common import FlagError, add_activations, finite, parse_size, text, whole
from mer.errors import MerError, ParamError

_FINISH = {"stop": "end of text", "length": "max tokens", "context": "context full"}


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    p.add_argument(
        "--model",
        help="model directory, .gguf file or mer store, or a name from `mer models` "
        "(default: the bundled model)",
    )
    p.add_argument("--prompt", required=True, type=text, help="the prompt text")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument("--system", type=text, help="system message (with --chat)")
    p.add_argument(
        "--chat-template-kwargs",
        type=_template_kwargs,
        metavar="JSON",
        help="further chat-template variables (with --chat), e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument("--max-tokens", type=whole(0), default=256, help="tokens to generate at most")
    p.add_argument("--temperature", type=finite, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=whole(0), default=0, help="keep the k likeliest (0 = off)")
    p.add_argument("--top-p", type=finite, default=0.95, help="nucleus sampling mass")
    p.add_argument("--min-p", type=finite, default=0.0, help="drop ids below min-p x the top")
    p.add_argument("--repetition-penalty", type=finite, default=1.0, help="1 = off")
    p.add_argument("--presence-penalty", type=finite, default=0.0, help="0 = off")
    p.add_argument("--frequency-penalty", type=finite, default=0.0, help="0 = off")
    p.add_argument("--seed", type=whole(0), default=None, help="same seed, same text")
    p.add_argument("--quant", choices=["q8_0", "q4_0"], help="quantize expert weights on load")
    add_activations(p)
    p.add_argument(
        "--threads",
        type=whole(1),
        help="most kernel threads (default: all cores); each product gets one or all of them, "
        "whichever measures faster, so a busy machine slows mer down gracefully",
    )
    p.add_argument("--max-seq-len", type=whole(1), help="cap the context length (tokens)")
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


def _template_kwargs(value: str) -> dict:
    import json

    from mer.http.openai import RESERVED_TEMPLATE_VARS

    try:
        parsed = json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError("not valid JSON") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("must be a JSON object of template variables")
    taken = sorted(RESERVED_TEMPLATE_VARS & set(parsed))
    if taken:
        raise argparse.ArgumentTypeError(f"cannot set {taken[0]!r}: mer sets it")
    return parsed


def _check_generate_flags(opts: argparse.Namespace) -> None:
    """Flag combinations that would otherwise be ignored without a word, and values that can
    be checked before a model loads."""
    if opts.system is not None and not opts.chat:
        raise FlagError("--system needs --chat (a system message is part of a chat)")
    if opts.chat_template_kwargs is not None and not opts.chat:
        raise FlagError("--chat-template-kwargs needs --chat")
    if opts.io_backend is not None and opts.cache_bytes is None:
        raise FlagError("--io-backend applies only with --cache-bytes (streamed experts)")
    if not opts.chat and opts.prompt == "":
        raise FlagError("--prompt is empty (give some text, or use --chat)")
    if opts.threads is not None:
        import numba

        if opts.threads > numba.config.NUMBA_NUM_THREADS:
            raise FlagError(
                f"--threads {opts.threads}: this machine runs at most "
                f"{numba.config.NUMBA_NUM_THREADS} kernel threads"
            )


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
        raise FlagError(f"--{err.name.replace('_', '-')} {err.message}") from None


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
        activations=opts.activations,
    )
    try:
        return _generate(model, params, opts)
    finally:
        model.close()


def _warm_up(model) -> float:
    """Compile the kernels before timing anything; on a terminal, say so when numba really
    compiles (not when it loads them from its cache)."""
    from numba.core import event

    class Notice(event.Listener):
        said = False

        def on_start(self, _event) -> None:
            if not self.said:
                self.said = True
                print("mer: compiling kernels (first run only)...", file=sys.stderr, flush=True)

        def on_end(self, _event) -> None:
            pass

    start = time.perf_counter()
    if sys.stderr.isatty():
        with event.install_listener("numba:compile", Notice()):
            model.warm_up()
    else:
        model.warm_up()
    return time.perf_counter() - start


def _generate(model, params, opts: argparse.Namespace) -> int:
    tok = model.tokenizer
    if tok is None:
        raise MerError(f"{model.source}: the model has no tokenizer")
    if opts.chat:
        messages = [{"role": "system", "content": opts.system}] if opts.system else []
        prompt_ids = tok.encode_chat(
            [*messages, {"role": "user", "content": opts.prompt}],
            template_kwargs=opts.chat_template_kwargs,
        )
    else:
        prompt_ids = tok.encode(opts.prompt)
    if not prompt_ids:
        raise FlagError("--prompt encodes to no tokens")
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
