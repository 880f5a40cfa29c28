"""`mer serve`'s configuration: one frozen table per actor, composed into `ServeConfig`.

Loaded from TOML (`configs/mer.toml` documents every key with its default); a key this file
does not know is an error that names it, as is a value of the wrong type or range. Every value
has a default, so no file is needed; the command line's common flags override the file.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mer.errors import MerError
from mer.kernels import ACTIVATIONS


class ConfigError(MerError):
    """A configuration file or value is wrong; the message names the key."""


def _size(value: Any, key: str) -> int:
    """Bytes from an integer or a string such as "2G" (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        text = value.strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in units else ""
        try:
            f = float(text[: len(text) - len(unit)])
        except ValueError:
            raise ConfigError(f'{key}: not a size: {value!r} (try "2G")') from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}: not a size: {value!r}")
        number = int(f * units[unit])
    else:
        raise ConfigError(f'{key}: a size is a number of bytes or a string such as "2G"')
    if number <= 0:
        raise ConfigError(f"{key}: must be positive")
    return number


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_waiting: int = 256  # requests queued beyond the running ones before 429
    max_body_bytes: int = 4 << 20  # a larger request body is refused (413)
    max_tokens: int | None = None  # the most tokens one choice may ask for (default: context)
    model_name: str | None = None  # the model's id in the API (default: its file's name)
    # API keys: key -> class; with any key set, every request needs one (Bearer)
    keys: dict[str, str] = field(default_factory=dict)
    # admission weights by class: waiting requests start in weighted round-robin
    classes: dict[str, int] = field(default_factory=dict)
    default_class: str = "default"  # the class of requests when no keys are set


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int = 512
    max_seqs: int = 16
    prefill_chunk: int = 256
    kv_budget_tokens: int = 65536
    prefix_cache: bool = True  # reuse the KV of prompt prefixes seen before (bit-identical)
    threads: int | None = None  # kernel threads of the engine (default: all cores)
    activations: str | None = None  # "q8" or "f32" (default: a store's own, else q8)


@dataclass(frozen=True)
class ComputeConfig:
    count: int | None = None  # compute workers (default: one per core)
    stripes: int = 8  # a product is split into this many stripes, whatever the worker count
    min_work: int = 1 << 22  # smaller products (multiply-adds) run in the engine itself
    measured: bool = True  # larger ones go where they measure faster (False: always workers)
    round_timeout_s: float = 5.0  # a worker this late is killed and its stripes done by the engine


@dataclass(frozen=True)
class CacheConfig:
    bytes: int | None = None  # the expert cache's budget; None: every expert resident
    pin_fraction: float = 0.25
    prefetch: bool = True


@dataclass(frozen=True)
class IoConfig:
    count: int = 1
    queue_depth: int = 32  # reads (of up to 8 MiB) in flight per io actor
    backend: str = "auto"
    coalesce: bool = True  # one read for experts that follow each other on disk
    reverify: bool = False  # hash every read, not only each range's first


@dataclass(frozen=True)
class SupervisorConfig:
    intensity: int = 5  # restarts allowed within `period_s` before escalating (OTP)
    period_s: float = 60.0
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 30.0  # an actor silent this long is hung: it is replaced
    start_timeout_s: float = 600.0  # loading a large model takes a while
    drain_timeout_s: float = 30.0
    runtime_dir: str | None = None  # default: $RUNTIME_DIRECTORY, else a private temp dir


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None
    api: ApiConfig = field(default_factory=ApiConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    io: IoConfig = field(default_factory=IoConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> ServeConfig:
        """The defaults, overridden by TOML file `path` if given."""
        if path is None:
            return cls().checked()
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
        return from_dict(data, str(path)).checked()

    def override(self, **values: Any) -> ServeConfig:
        """A copy with dotted keys ("api.port": 8080) set; None values are skipped."""
        config = self
        for dotted, value in values.items():
            if value is None:
                continue
            section, _, key = dotted.partition(".")
            if not key:
                config = replace(config, **{section: value})
            else:
                config = replace(
                    config, **{section: replace(getattr(config, section), **{key: value})}
                )
        return config.checked()

    def checked(self) -> ServeConfig:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {what}")

        need(1 <= self.api.port <= 65535, "api.port", "must be a port number (1-65535)")
        need(self.api.max_waiting >= 0, "api.max_waiting", "must be 0 or more")
        need(self.api.max_body_bytes >= 1024, "api.max_body_bytes", "must be at least 1024")
        need(
            self.api.max_tokens is None or self.api.max_tokens >= 1,
            "api.max_tokens",
            "must be at least 1",
        )
        for key, cls in self.api.keys.items():
            need(
                isinstance(key, str) and len(key) >= 8 and isinstance(cls, str),
                "api.keys",
                "must map keys of at least 8 characters to class names",
            )
        for cls, weight in self.api.classes.items():
            need(
                isinstance(weight, int) and not isinstance(weight, bool) and weight >= 1,
                f"api.classes.{cls}",
                "must be a whole number weight of at least 1",
            )
        for name in ("max_batch_tokens", "max_seqs", "prefill_chunk", "kv_budget_tokens"):
            need(getattr(self.engine, name) >= 1, f"engine.{name}", "must be at least 1")
        need(
            self.engine.threads is None or self.engine.threads >= 1,
            "engine.threads",
            "must be at least 1",
        )
        need(
            self.engine.activations in (None, *ACTIVATIONS),
            "engine.activations",
            f"must be {' or '.join(ACTIVATIONS)}",
        )
        need(
            self.compute.count is None or self.compute.count >= 0,
            "compute.count",
            "must be 0 or more",
        )
        need(1 <= self.compute.stripes <= 64, "compute.stripes", "must be between 1 and 64")
        need(self.compute.min_work >= 0, "compute.min_work", "must be 0 or more")
        need(self.compute.round_timeout_s > 0, "compute.round_timeout_s", "must be positive")
        need(0 <= self.cache.pin_fraction < 1, "cache.pin_fraction", "must be in [0, 1)")
        need(self.io.count >= 1, "io.count", "must be at least 1")
        need(self.io.queue_depth >= 1, "io.queue_depth", "must be at least 1")
        need(
            self.io.backend in ("auto", "uring", "preadv", "buffered"),
            "io.backend",
            "must be auto, uring, preadv or buffered",
        )
        s = self.supervisor
        need(s.intensity >= 0, "supervisor.intensity", "must be 0 or more")
        for name in (
            "period_s",
            "heartbeat_s",
            "heartbeat_timeout_s",
            "start_timeout_s",
            "drain_timeout_s",
        ):
            need(getattr(s, name) > 0, f"supervisor.{name}", "must be positive")
        need(
            s.heartbeat_timeout_s > 2 * s.heartbeat_s,
            "supervisor.heartbeat_timeout_s",
            "must be more than twice supervisor.heartbeat_s",
        )
        need(
            self.log.level in ("debug", "info", "warning", "error"),
            "log.level",
            "must be debug, info, warning or error",
        )
        return self


_SIZES = {"cache.bytes"}
_TABLES = {f.name: f.default_factory for f in fields(ServeConfig) if f.name != "model"}  # type: ignore[misc]


def from_dict(data: dict[str, Any], source: str) -> ServeConfig:
    """A ServeConfig from parsed TOML; unknown keys and wrong types are errors."""
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name == "model":
            if not isinstance(value, str):
                raise ConfigError(f"{source}: model must be a path (a string)")
            values["model"] = value
            continue
        if name not in _TABLES:
            raise ConfigError(
                f"{source}: unknown key {name!r} (known: model, {', '.join(_TABLES)})"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        default = _TABLES[name]()
        known = {f.name: f for f in fields(default)}
        table = {}
        for key, item in value.items():
            dotted = f"{name}.{key}"
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {dotted!r} (known in [{name}]: {', '.join(known)})"
                )
            table[key] = _typed(item, getattr(default, key), str(known[key].type), dotted, source)
        values[name] = replace(default, **table)
    return ServeConfig(**values)


def _typed(value: Any, default: Any, annotation: str, key: str, source: str) -> Any:
    if key in _SIZES:
        return _size(value, f"{source}: {key}")
    if value is None:
        raise ConfigError(f"{source}: {key}: TOML has no null; leave the key out instead")
    want = annotation.replace(" | None", "")
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(want, True)
    if not ok:
        raise ConfigError(f"{source}: {key} must be a{'n' if want == 'int' else ''} {want}")
    return float(value) if want == "float" else value
