"""The `mer` command line.

Every failure a user can cause ends as one line on stderr, `mer: error: ...`, naming the flag
or file and what to do, and a non-zero exit: flag errors exit 2, other errors 1, signals
128 + the signal's number (SIGINT, SIGTERM and SIGHUP all unwind the same way, so shared
memory and partial files are cleaned up), a closed stdout 141, a bug 70. Each subcommand is a
module here with an `add_*` function that declares its flags and a `run` function.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from mer import __version__
from mer.cli.bench import add_bench
from mer.cli.common import EXIT_FLAG, FlagError, Interrupted, Parser, parse_size
from mer.cli.files import add_convert, add_trace, run_models
from mer.cli.generate import add_generate
from mer.cli.serve import add_serve
from mer.cli.synth import add_synth
from mer.cli.top import add_top
from mer.errors import MerError, os_error_text

__all__ = ["build_parser", "main", "parse_size"]
_EXIT_ERROR, _EXIT_PIPE = 1, 128 + signal.SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mer", description="Mixture-of-Experts inference on the CPU")
    parser.add_argument("--version", action="version", version=f"mer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_generate(sub)
    add_convert(sub)
    sub.add_parser("models", help="list where models come from").set_defaults(run=run_models)
    add_trace(sub)
    add_synth(sub)
    add_bench(sub)
    add_serve(sub)
    add_top(sub)
    return parser


def _on_signal(signum: int, frame: object) -> None:
    # Later signals must not interrupt the clean-up the first one starts.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _setup() -> None:
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
    _setup()
    try:
        opts = build_parser().parse_args(argv)
        return opts.run(opts)
    except FlagError as err:
        print(f"mer: error: {err}", file=sys.stderr)
        return EXIT_FLAG
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
