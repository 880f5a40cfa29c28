"""GET /metrics: Prometheus text, named after vLLM's metrics (`mer:` instead of `vllm:`), plus
what only mer has — the expert cache layer by layer, the disk, restarts by actor kind.

Figures come from every actor, not only the api: request counts and latencies are the api's
own (it sees each request arrive, start, stream and end); the scheduler's queues, KV-cache
use and the prefix cache are the engine's (asked at each scrape); the expert cache and the
disk are the cache actor's (or the engine's, when it streams experts itself); restarts are
the supervisor's. A figure that an actor keeps is reported as it last said; after an actor
restarts its counters start again from zero, which Prometheus's rate() treats as a reset.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (seconds)
_TTFT = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)  # noqa: E501
_ITL = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)  # noqa: E501
_E2E = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)  # noqa: E501


class Metrics:
    """The api's own metrics, and the others' figures as they last reported them."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter(
            "mer:prompt_tokens", "Prompt tokens of finished requests", labels, registry=r
        )
        self.generation_tokens = Counter(
            "mer:generation_tokens", "Generated tokens sent to clients", labels, registry=r
        )
        self.requests = Counter(
            "mer:request_success",
            "Requests finished, by finish reason",
            [*labels, "finished_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "mer:request_rejected", "Requests refused, by HTTP status", [*labels, "status"],
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "mer:time_to_first_token_seconds", "Time to first token", labels, buckets=_TTFT,
            registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "mer:inter_token_latency_seconds", "Time between tokens of a choice", labels,
            buckets=_ITL, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "mer:e2e_request_latency_seconds", "Request latency, arrival to last token", labels,
            buckets=_E2E, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "mer:request_queue_time_seconds", "Time a request waited to be admitted", labels,
            buckets=_E2E, registry=r,
        )  # fmt: skip
        self.cancelled = Counter(
            "mer:request_cancelled", "Requests whose client went away", labels, registry=r
        )
        self.snapshot = _Snapshot(model)
        r.register(self.snapshot)

    def render(self, engine: dict | None, cache: dict | None, status: dict | None) -> bytes:
        self.snapshot.engine, self.snapshot.cache, self.snapshot.status = engine, cache, status
        return generate_latest(self.registry)

    def labels(self):
        return {"model_name": self.model}


class _Snapshot:
    """The other actors' figures, as a custom collector."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.engine: dict | None = None
        self.cache: dict | None = None
        self.status: dict | None = None

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable:
        m = [self.model]
        engine = self.engine or {}
        running = GaugeMetricFamily(
            "mer:num_requests_running", "Sequences running in the engine", labels=["model_name"]
        )
        running.add_metric(m, engine.get("running", 0))
        yield running
        waiting = GaugeMetricFamily(
            "mer:num_requests_waiting",
            "Sequences waiting: in the engine's queue and in the api's admission queue",
            labels=["model_name"],
        )
        waiting.add_metric(m, engine.get("waiting", 0) + engine.get("api_waiting", 0))
        yield waiting
        kv = GaugeMetricFamily(
            "mer:kv_cache_usage_perc",
            "KV-cache use: positions reserved and held by the prefix cache / budget (0-1)",
            labels=["model_name"],
        )
        kv.add_metric(m, engine.get("kv_usage", 0.0))
        yield kv
        for name, key, text in (
            (
                "kv_cache_reserved_tokens",
                "kv_reserved_tokens",
                "KV positions running sequences hold",
            ),
            (
                "prefix_cache_held_tokens",
                "prefix_held_tokens",
                "KV positions the prefix cache holds",
            ),
        ):
            family = GaugeMetricFamily(f"mer:{name}", text, labels=["model_name"])
            family.add_metric(m, engine.get(key, 0))
            yield family
        for name, key, text in (
            ("prefix_cache_queries", "prefix_queries_tokens", "Prompt tokens looked up"),
            ("prefix_cache_hits", "prefix_hits_tokens", "Prompt tokens found in the cache"),
        ):
            family = CounterMetricFamily(f"mer:{name}", text, labels=["model_name"])
            family.add_metric(m, engine.get(key, 0))
            yield family
        yield from self._cache(m)
        restarts = CounterMetricFamily(
            "mer:actor_restarts", "Actor restarts, by kind", labels=["model_name", "kind"]
        )
        up = GaugeMetricFamily(
            "mer:actors", "Actors running, by kind", labels=["model_name", "kind"]
        )
        by_kind: dict[str, list[int]] = {}
        for actor in (self.status or {}).get("actors", []):
            counts = by_kind.setdefault(actor["kind"], [0, 0])
            counts[0] += actor.get("restarts", 0)
            counts[1] += 1 if actor.get("ready") else 0
        for kind, (n, ready) in sorted(by_kind.items()):
            restarts.add_metric([self.model, kind], n)
            up.add_metric([self.model, kind], ready)
        yield restarts
        yield up

    def _cache(self, m: list[str]) -> Iterable:
        cache = self.cache
        if not cache:
            return
        hits = CounterMetricFamily(
            "mer:expert_cache_hits", "Expert lookups found in RAM, by layer",
            labels=["model_name", "layer"],
        )  # fmt: skip
        misses = CounterMetricFamily(
            "mer:expert_cache_misses", "Expert lookups that read the disk, by layer",
            labels=["model_name", "layer"],
        )  # fmt: skip
        for layer, figures in sorted((cache.get("per_layer") or {}).items(), key=_layer_key):
            hits.add_metric(
                [self.model, str(layer)], figures.get("hits", 0) + figures.get("inflight_hits", 0)
            )
            misses.add_metric([self.model, str(layer)], figures.get("misses", 0))
        yield hits
        yield misses
        per_expert = cache.get("per_expert") or {}
        if per_expert:  # models with few experts: a heatmap's worth of series
            labels = ["model_name", "layer", "expert"]
            found = CounterMetricFamily(
                "mer:expert_cache_expert_hits", "Lookups of one expert found in RAM", labels=labels
            )
            missed = CounterMetricFamily(
                "mer:expert_cache_expert_misses", "Lookups of one expert that read the disk",
                labels=labels,
            )  # fmt: skip
            for layer, experts in sorted(per_expert.items(), key=_layer_key):
                for expert, (n_found, n_missed) in sorted(experts.items(), key=_layer_key):
                    found.add_metric([self.model, str(layer), str(expert)], n_found)
                    missed.add_metric([self.model, str(layer), str(expert)], n_missed)
            yield found
            yield missed
        for name, key, text in (
            ("ssd_read_bytes", "bytes_read", "Bytes of experts read from the disk"),
            ("ssd_read_seconds", "read_busy_s", "Seconds the disk was busy with expert reads"),
            ("expert_demand_reads", "demand_reads", "Expert reads a token waited for"),
            ("expert_prefetches", "prefetches", "Expert reads issued ahead of need"),
            ("expert_prefetches_used", "prefetch_used", "Prefetched experts later used"),
        ):
            family = CounterMetricFamily(f"mer:{name}", text, labels=["model_name"])
            family.add_metric(m, cache.get(key, 0))
            yield family
        slots = GaugeMetricFamily(
            "mer:expert_cache_slots", "Experts the RAM cache holds at most", labels=["model_name"]
        )
        slots.add_metric(m, cache.get("slots", 0))
        yield slots
        resident = GaugeMetricFamily(
            "mer:expert_cache_resident", "Experts in RAM or being read now", labels=["model_name"]
        )
        resident.add_metric(m, cache.get("resident", 0))
        yield resident


def _layer_key(item):
    layer = item[0]
    return int(layer) if str(layer).isdigit() else 0
