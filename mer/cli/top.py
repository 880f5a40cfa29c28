"""`mer top`: a terminal dashboard of a running `mer serve` (mer.top), or with --once one
plain-text snapshot for scripts."""

from __future__ import annotations

import argparse
import os
import sys
import time

from mer.cli.common import finite, text


def _interval(value: str) -> float:
    number = finite(value)
    if not 0.05 <= number <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.05 and 3600 seconds, got {value}")
    return number


def add_top(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "top",
        help="watch a running service: requests, tokens/s, the expert cache, the disk, actors",
        description="Polls the service's /metrics, /ready and /v1/models. Keys: q quits, "
        "p pauses, r resets the windows.",
    )
    p.add_argument("--url", type=text, default="http://127.0.0.1:8000", help="the service")
    p.add_argument(
        "--api-key",
        type=text,
        default=os.environ.get("MER_API_KEY"),
        help="a key from the service's [api] keys (default: $MER_API_KEY)",
    )
    p.add_argument("--interval", type=_interval, default=1.0, help="seconds between polls")
    p.add_argument(
        "--once",
        action="store_true",
        help="print one plain-text snapshot (two polls --interval apart, for rates) and exit",
    )
    p.set_defaults(run=run_top)


def run_top(opts: argparse.Namespace) -> int:
    if opts.once:
        from mer.top.monitor import Monitor, fetch, render_text

        monitor = Monitor(opts.url)
        monitor.add(fetch(opts.url, opts.api_key))
        time.sleep(opts.interval)
        sys.stdout.write(render_text(monitor.add(fetch(opts.url, opts.api_key))))
        return 0
    if not sys.stdout.isatty():
        from mer.cli.common import FlagError

        raise FlagError("mer top draws on a terminal; use --once for a plain-text snapshot")
    from mer.top.app import TopApp

    TopApp(opts.url, opts.api_key, opts.interval).run()
    return 0
