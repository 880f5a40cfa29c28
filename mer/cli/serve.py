"""`mer serve`: the OpenAI-style HTTP service, as a supervisor of actor processes."""

from __future__ import annotations

import argparse

from mer.cli.common import FlagError, add_activations, parse_size, whole


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over OpenAI-style HTTP (actors supervised; systemd-ready)",
        description="Starts the engine and api actors from the configuration (defaults, then "
        "--config FILE, then these flags), restarts any that fails, reloads on SIGHUP and "
        "drains on SIGTERM. configs/mer.toml documents every setting.",
    )
    p.add_argument("--model", help="model directory, .gguf file or mer store (default: bundled)")
    p.add_argument("--config", help="a TOML configuration file")
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=whole(1), help="port to listen on (default: 8000)")
    p.add_argument("--cache-bytes", type=parse_size, help="stream experts through a RAM cache")
    p.add_argument("--compute", type=whole(0), help="compute workers (default: one per core)")
    p.add_argument("--io", type=whole(1), help="I/O actors for streamed experts (default: 1)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="logging")
    add_activations(p)
    p.set_defaults(run=run_serve)


def run_serve(opts: argparse.Namespace) -> int:
    import logging

    from mer.actors.base import setup_logging
    from mer.config import ConfigError, ServeConfig
    from mer.models.sources import resolve_model
    from mer.supervisor.supervisor import Supervisor

    overrides = {
        "model": str(resolve_model(opts.model)) if opts.model else None,
        "api.host": opts.host,
        "api.port": opts.port,
        "cache.bytes": opts.cache_bytes,
        "compute.count": opts.compute,
        "io.count": opts.io,
        "log.level": opts.log_level,
        "engine.activations": opts.activations,
    }
    try:
        config = ServeConfig.load(opts.config).override(**overrides)
    except ConfigError as err:
        raise FlagError(str(err)) from None
    if config.model is None:
        config = config.override(model=str(resolve_model(None)))
    setup_logging(config.log.level, "supervisor", 0)
    logging.getLogger("mer.supervisor").info("event=config model=%s", config.model)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return Supervisor(config, opts.config, overrides).run()
