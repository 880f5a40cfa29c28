"""What `mer top` shows, without a screen: samples of a service's public endpoints and the
figures a window of them gives.

A `Sample` is one poll: `/v1/models` (the model's id; it is also where a missing or wrong
API key shows, as 401), `/ready` (every actor) and `/metrics` (Prometheus text, parsed with
prometheus-client's own parser). A `Monitor` keeps the samples of the last `span_s` seconds
and turns them into a `View`: rates between the last two samples (tokens/s, GB/s), figures
over the window (latency percentiles from histogram bucket deltas, hit rates per layer and
per expert, bytes per token, read-ahead precision), and restarts seen since it began. The
dashboard (`mer.top.app`) and `mer top --once` (`render_text`) both draw a `View`.

Counters restart from zero when the actor that keeps them restarts; a delta that goes
negative is read as such a reset, and the window starts again from the newer sample, as
Prometheus's rate() does.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field

from mer.errors import MerError

RESTART_HIGHLIGHT_S = 15.0  # a restarted actor stays highlighted this long


class ServiceUnavailable(MerError):
    """Nothing answers at the URL, or it answered but is not a mer service."""


class Unauthorized(MerError):
    """The service wants an API key that was not given, or refused the one given."""


@dataclass
class Sample:
    t: float  # time.monotonic() when taken
    model: str | None
    state: str  # the supervisor's: starting, serving, reloading, draining; unknown if silent
    actors: list[dict]
    series: dict[str, list[tuple[dict, float]]]  # Prometheus sample name -> (labels, value)

    def total(self, name: str) -> float:
        """The sum of a series over its labels (0 where the service does not report it)."""
        return sum(v for _, v in self.series.get(name, ()))

    def by(self, name: str, *keys: str) -> dict[tuple, float]:
        """A series summed by the values of the labels `keys`."""
        out: dict[tuple, float] = {}
        for labels, v in self.series.get(name, ()):
            k = tuple(labels.get(key, "") for key in keys)
            out[k] = out.get(k, 0.0) + v
        return out

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """A histogram's cumulative buckets, (upper bound, count), summed over other labels."""
        by_le = self.by(name + "_bucket", "le")
        return sorted((float(le), n) for (le,), n in by_le.items())


def fetch(url: str, api_key: str | None = None, timeout: float = 5.0) -> Sample:
    """One sample of the service at `url`. ServiceUnavailable when nothing answers,
    Unauthorized on 401; both name what to do."""
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def get(path: str) -> tuple[int, bytes]:
        request = urllib.request.Request(base + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            text = getattr(reason, "strerror", None) or str(reason)
            raise ServiceUnavailable(f"no service answers at {base} ({text})") from None

    status, body = get("/v1/models")
    if status == 401:
        if api_key:
            raise Unauthorized(
                f"the service at {base} refused the API key (401): pass one of the keys in "
                "its [api] keys with --api-key KEY"
            )
        raise Unauthorized(
            f"the service at {base} needs an API key (401): pass --api-key KEY (or set MER_API_KEY)"
        )
    model = None
    if status == 200:
        try:
            model = json.loads(body)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ServiceUnavailable(f"{base} answers, but not as a mer service") from None
    elif status != 503:  # 503: loading or draining; the rest still answers
        raise ServiceUnavailable(f"{base} answered /v1/models with HTTP {status}")
    status, body = get("/ready")
    try:
        ready = json.loads(body)
    except ValueError:
        ready = {}
    status, body = get("/metrics")
    if status != 200:
        raise ServiceUnavailable(f"{base} answered /metrics with HTTP {status}")
    try:
        series = parse_metrics(body.decode("utf-8", "replace"))
    except ValueError as err:
        raise ServiceUnavailable(f"{base}/metrics is not Prometheus text ({err})") from None
    return Sample(
        time.monotonic(),
        model,
        str(ready.get("state", "unknown")),
        list(ready.get("actors", [])),
        series,
    )


def parse_metrics(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text -> {sample name: [(labels, value)]}, with prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    series: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            series.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return series


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over cumulative `buckets` (upper bound, count): linear
    within the bucket that holds the q-th observation; the highest finite bound if it falls
    in +Inf. None with no observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _delta_buckets(new: list, old: list) -> list[tuple[float, float]]:
    before = dict(old)
    return [(le, n - before.get(le, 0.0)) for le, n in new]


@dataclass
class ActorRow:
    kind: str
    index: int
    pid: int | None
    ready: bool
    restarts: int
    uptime_s: float | None
    heartbeat_age_s: float | None
    restarted_ago_s: float | None  # seconds since this monitor saw it restart; None if not seen


@dataclass
class View:
    url: str
    model: str | None
    state: str
    interval_s: float  # between the last two samples (0 with one sample)
    window_s: float  # span of the samples the window figures use
    running: int = 0
    waiting: int = 0
    prompt_tps: float | None = None
    generation_tps: float | None = None
    tps_history: list[float] = field(default_factory=list)
    requests_done: int = 0
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    itl_p50: float | None = None
    itl_p99: float | None = None
    streamed: bool = False  # the model streams experts through a cache
    layer_hit_rate: dict[int, float | None] = field(default_factory=dict)
    expert_hit_rate: dict[int, dict[int, float | None]] = field(default_factory=dict)
    hit_rate: float | None = None  # all layers, over the window
    read_gbps: float | None = None
    gbps_history: list[float] = field(default_factory=list)
    bytes_per_token: float | None = None
    bytes_read: float = 0.0
    readahead_precision: float | None = None
    readahead_waste: float | None = None
    kv_usage: float = 0.0
    arena_resident: int = 0
    arena_slots: int = 0
    actors: list[ActorRow] = field(default_factory=list)


def _rate(new: float, old: float, dt: float) -> float | None:
    if dt <= 0 or new < old:
        return None
    return (new - old) / dt


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


class Monitor:
    """The samples of the last `span_s` seconds (module docstring)."""

    def __init__(self, url: str, span_s: float = 60.0, history: int = 60) -> None:
        self.url = url
        self.span_s = span_s
        self.samples: deque[Sample] = deque()
        self.tps_history: deque[float] = deque(maxlen=history)
        self.gbps_history: deque[float] = deque(maxlen=history)
        self._seen: dict[tuple[str, int], tuple[int, str]] = {}  # actor -> (restarts, incarnation)
        self._restarted: dict[tuple[str, int], float] = {}  # actor -> when seen restarting

    def reset(self) -> None:
        """Forget the windows (the 'r' key); restarts seen stay."""
        self.samples.clear()
        self.tps_history.clear()
        self.gbps_history.clear()

    def add(self, sample: Sample) -> View:
        if self.samples and _went_back(sample, self.samples[-1]):
            self.samples.clear()  # a counter reset: an actor that keeps it restarted
        self.samples.append(sample)
        while len(self.samples) > 2 and sample.t - self.samples[0].t > self.span_s:
            self.samples.popleft()
        self._note_restarts(sample)
        view = self._view()
        if view.generation_tps is not None:
            self.tps_history.append(view.generation_tps)
        if view.read_gbps is not None:
            self.gbps_history.append(view.read_gbps)
        view.tps_history = list(self.tps_history)
        view.gbps_history = list(self.gbps_history)
        return view

    def _note_restarts(self, sample: Sample) -> None:
        for a in sample.actors:
            key = (a.get("kind", "?"), int(a.get("index", 0)))
            now = (int(a.get("restarts", 0)), str(a.get("incarnation", "")))
            before = self._seen.get(key)
            if before is not None and (now[0] > before[0] or now[1] != before[1]):
                self._restarted[key] = sample.t
            self._seen[key] = now

    def _view(self) -> View:
        new, first = self.samples[-1], self.samples[0]
        prev = self.samples[-2] if len(self.samples) > 1 else new
        dt = new.t - prev.t
        v = View(self.url, new.model, new.state, dt, new.t - first.t)
        v.running = int(new.total("mer:num_requests_running"))
        v.waiting = int(new.total("mer:num_requests_waiting"))
        v.kv_usage = new.total("mer:kv_cache_usage_perc")
        v.requests_done = int(new.total("mer:request_success_total"))
        if dt > 0:
            for attr, name in (
                ("prompt_tps", "mer:prompt_tokens_total"),
                ("generation_tps", "mer:generation_tokens_total"),
            ):
                setattr(v, attr, _rate(new.total(name), prev.total(name), dt))
        for prefix, name in (
            ("ttft", "mer:time_to_first_token_seconds"),
            ("itl", "mer:inter_token_latency_seconds"),
        ):
            if first is new:  # one sample: no window yet
                break
            window = _delta_buckets(new.buckets(name), first.buckets(name))
            setattr(v, prefix + "_p50", histogram_quantile(0.5, window))
            setattr(v, prefix + "_p99", histogram_quantile(0.99, window))
        self._cache(v, new, first, prev, dt)
        for a in new.actors:
            key = (a.get("kind", "?"), int(a.get("index", 0)))
            seen = self._restarted.get(key)
            v.actors.append(
                ActorRow(
                    key[0],
                    key[1],
                    a.get("pid"),
                    bool(a.get("ready")),
                    int(a.get("restarts", 0)),
                    a.get("uptime_s"),
                    a.get("heartbeat_age_s"),
                    None if seen is None else new.t - seen,
                )
            )
        return v

    def _cache(self, v: View, new: Sample, first: Sample, prev: Sample, dt: float) -> None:
        v.streamed = "mer:expert_cache_slots" in new.series
        if not v.streamed:
            return
        v.arena_resident = int(new.total("mer:expert_cache_resident"))
        v.arena_slots = int(new.total("mer:expert_cache_slots"))
        v.bytes_read = new.total("mer:ssd_read_bytes_total")
        if first is new:  # one sample: no window yet
            return
        base = first
        hits = new.by("mer:expert_cache_hits_total", "layer")
        misses = new.by("mer:expert_cache_misses_total", "layer")
        hits0 = base.by("mer:expert_cache_hits_total", "layer")
        misses0 = base.by("mer:expert_cache_misses_total", "layer")
        found_all = looked_all = 0.0
        for (layer,) in sorted(set(hits) | set(misses), key=lambda k: _int(k[0])):
            found = hits.get((layer,), 0) - hits0.get((layer,), 0)
            looked = found + misses.get((layer,), 0) - misses0.get((layer,), 0)
            v.layer_hit_rate[_int(layer)] = _ratio(found, looked)
            found_all, looked_all = found_all + found, looked_all + looked
        v.hit_rate = _ratio(found_all, looked_all)
        eh = new.by("mer:expert_cache_expert_hits_total", "layer", "expert")
        em = new.by("mer:expert_cache_expert_misses_total", "layer", "expert")
        eh0 = base.by("mer:expert_cache_expert_hits_total", "layer", "expert")
        em0 = base.by("mer:expert_cache_expert_misses_total", "layer", "expert")
        for key in sorted(set(eh) | set(em), key=lambda k: (_int(k[0]), _int(k[1]))):
            found = eh.get(key, 0) - eh0.get(key, 0)
            looked = found + em.get(key, 0) - em0.get(key, 0)
            v.expert_hit_rate.setdefault(_int(key[0]), {})[_int(key[1])] = _ratio(found, looked)
        read = "mer:ssd_read_bytes_total"
        if dt > 0:
            rate = _rate(new.total(read), prev.total(read), dt)
            v.read_gbps = None if rate is None else rate / 1e9

        def delta(name: str) -> float:
            return new.total(name) - base.total(name)

        v.bytes_per_token = _ratio(delta(read), delta("mer:generation_tokens_total"))
        issued = delta("mer:expert_prefetches_total")
        v.readahead_precision = _ratio(delta("mer:expert_prefetches_used_total"), issued)
        if v.readahead_precision is not None:
            v.readahead_waste = max(0.0, 1.0 - v.readahead_precision)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


_MONOTONIC = (
    "mer:generation_tokens_total",
    "mer:prompt_tokens_total",
    "mer:ssd_read_bytes_total",
    "mer:expert_prefetches_total",
)


def _went_back(new: Sample, old: Sample) -> bool:
    return any(new.total(name) < old.total(name) for name in _MONOTONIC)


# -- plain text (`mer top --once`) ---------------------------------------------------------
SECTIONS = ("service", "requests", "latency", "expert cache", "disk", "memory", "actors")


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def fmt_rate(x: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def actor_lines(v: View) -> list[str]:
    lines = [f"{'actor':<12}{'pid':>8}{'up':>9}{'restarts':>10}{'beat':>9}  state"]
    for a in v.actors:
        state = "ready" if a.ready else "starting"
        if a.restarted_ago_s is not None and a.restarted_ago_s < RESTART_HIGHLIGHT_S:
            state += f"  RESTARTED {a.restarted_ago_s:.0f} s ago"
        lines.append(
            f"{a.kind + '.' + str(a.index):<12}{a.pid or '-':>8}{fmt_seconds(a.uptime_s):>9}"
            f"{a.restarts:>10}{fmt_seconds(a.heartbeat_age_s):>9}  {state}"
        )
    return lines


def section_lines(v: View) -> dict[str, list[str]]:
    """Each section's lines, the same for the dashboard's panels and for --once."""
    out: dict[str, list[str]] = {}
    out["service"] = [f"{v.url}  model {v.model or '-'}  state {v.state}"]
    out["requests"] = [
        f"running {v.running}  waiting {v.waiting}  finished {v.requests_done}",
        f"prompt {fmt_rate(v.prompt_tps)} tok/s  generation {fmt_rate(v.generation_tps)} tok/s",
    ]
    span = f"over {fmt_seconds(v.window_s)}"
    out["latency"] = [
        f"time to first token  p50 {fmt_seconds(v.ttft_p50)}  p99 {fmt_seconds(v.ttft_p99)}",
        f"inter-token          p50 {fmt_seconds(v.itl_p50)}  p99 {fmt_seconds(v.itl_p99)}",
        span,
    ]
    if v.streamed:
        layers = "  ".join(
            f"L{layer} {fmt_share(rate)}" for layer, rate in v.layer_hit_rate.items()
        )
        out["expert cache"] = [f"hit rate {fmt_share(v.hit_rate)} {span}", layers or "no lookups"]
        width = 1 + max((max(e) for e in v.expert_hit_rate.values()), default=-1)
        for layer, experts in v.expert_hit_rate.items():
            cells = " ".join(fmt_share(experts.get(e)).rjust(4) for e in range(width))
            out["expert cache"].append(f"L{layer} experts: {cells}")
        out["disk"] = [
            f"read {fmt_rate(v.read_gbps, ' GB/s', 3)}  {fmt_bytes(v.bytes_per_token)} per "
            f"generated token",
            f"read in all {fmt_bytes(v.bytes_read)}",
            f"read-ahead precision {fmt_share(v.readahead_precision)}  "
            f"waste {fmt_share(v.readahead_waste)}",
        ]
    else:
        out["expert cache"] = ["none: every weight is resident in RAM"]
        out["disk"] = ["no expert reads: nothing streams from the disk"]
    arena = f"arena {v.arena_resident}/{v.arena_slots} experts" if v.streamed else "arena -"
    out["memory"] = [f"KV cache {fmt_share(v.kv_usage)}  {arena}"]
    out["actors"] = actor_lines(v)
    return out


def render_text(v: View) -> str:
    parts = []
    for name, lines in section_lines(v).items():
        parts.append(f"== {name}")
        parts.extend("  " + line for line in lines)
    return "\n".join(parts) + "\n"
