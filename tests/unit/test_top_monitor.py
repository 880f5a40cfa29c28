"""mer top's figures (mer.top.monitor) from the Prometheus text the service's own metrics
code renders: rates, windowed percentiles and hit rates, restarts and counter resets."""

from __future__ import annotations

import math

import pytest

from mer.http.metrics import Metrics
from mer.top.monitor import (
    SECTIONS,
    Monitor,
    Sample,
    histogram_quantile,
    parse_metrics,
    render_text,
)


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (math.inf, 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 9.8 / 10)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1 + 0.4 * 5 / 10)
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None
    # every observation past the last finite bound: that bound, as Prometheus answers
    assert histogram_quantile(0.5, [(1.0, 0.0), (2.0, 0.0), (math.inf, 4.0)]) == 2.0


class Service:
    """The api's real Metrics object, fed figures as the actors would report them."""

    def __init__(self) -> None:
        self.metrics = Metrics("m")
        self.labels = self.metrics.labels()
        self.cache = {
            "slots": 16,
            "resident": 12,
            "per_layer": {"0": {"hits": 0, "misses": 0}, "1": {"hits": 0, "misses": 0}},
            "per_expert": {"0": {"0": [0, 0], "1": [0, 0]}},
            "bytes_read": 0,
            "prefetches": 0,
            "prefetch_used": 0,
        }
        self.actors = [
            {"kind": "engine", "index": 0, "pid": 10, "restarts": 0, "incarnation": "a",
             "ready": True, "heartbeat_age_s": 0.2, "uptime_s": 30.0},
            {"kind": "compute", "index": 0, "pid": 11, "restarts": 0, "incarnation": "b",
             "ready": True, "heartbeat_age_s": 0.1, "uptime_s": 30.0},
        ]  # fmt: skip

    def tokens(self, prompt: int, generated: int) -> None:
        self.metrics.prompt_tokens.labels(**self.labels).inc(prompt)
        self.metrics.generation_tokens.labels(**self.labels).inc(generated)

    def sample(self, t: float, cache: bool = True) -> Sample:
        engine = {"running": 2, "waiting": 1, "kv_usage": 0.25}
        text = self.metrics.render(
            engine, self.cache if cache else None, {"state": "serving", "actors": self.actors}
        ).decode()
        return Sample(t, "m", "serving", [dict(a) for a in self.actors], parse_metrics(text))


def test_rates_percentiles_and_cache_figures_over_the_window():
    s = Service()
    monitor = Monitor("http://x", span_s=60)
    first = monitor.add(s.sample(0.0))
    assert first.generation_tps is None and first.streamed and first.hit_rate is None
    s.tokens(prompt=100, generated=40)
    for _ in range(10):
        s.metrics.ttft.labels(**s.labels).observe(0.3)
        s.metrics.itl.labels(**s.labels).observe(0.05)
    s.cache["per_layer"]["0"] = {"hits": 3, "inflight_hits": 1, "misses": 4}
    s.cache["per_layer"]["1"] = {"hits": 8, "misses": 0}
    s.cache["per_expert"]["0"] = {"0": [4, 0], "1": [0, 4]}
    s.cache.update(bytes_read=2e9, prefetches=10, prefetch_used=7)
    v = monitor.add(s.sample(2.0))
    assert v.generation_tps == pytest.approx(20.0) and v.prompt_tps == pytest.approx(50.0)
    assert v.running == 2 and v.waiting == 1 and v.kv_usage == 0.25
    assert 0.25 < v.ttft_p50 <= 0.5 and 0.025 < v.itl_p50 <= 0.05
    assert v.layer_hit_rate == {0: pytest.approx(0.5), 1: pytest.approx(1.0)}
    assert v.hit_rate == pytest.approx(12 / 16)
    assert v.expert_hit_rate == {0: {0: 1.0, 1: 0.0}}
    assert v.read_gbps == pytest.approx(1.0) and v.bytes_per_token == pytest.approx(5e7)
    assert v.readahead_precision == pytest.approx(0.7) and v.readahead_waste == pytest.approx(0.3)
    assert (v.arena_resident, v.arena_slots) == (12, 16)
    assert v.tps_history == [pytest.approx(20.0)]
    text = render_text(v)
    for name in SECTIONS:
        assert f"== {name}" in text
    assert "L0 50%" in text and "20.0 tok/s" in text and "1.000 GB/s" in text

    # nothing happens for a while: the instant rate drops to zero, the window still has it
    v = monitor.add(s.sample(4.0))
    assert v.generation_tps == 0.0 and v.hit_rate == pytest.approx(12 / 16)
    monitor.reset()
    v = monitor.add(s.sample(5.0))
    assert v.generation_tps is None and v.hit_rate is None and v.tps_history == []


def test_a_window_drops_old_samples():
    s = Service()
    monitor = Monitor("http://x", span_s=10)
    monitor.add(s.sample(0.0))
    s.cache["per_layer"]["0"] = {"hits": 0, "misses": 10}
    monitor.add(s.sample(5.0))
    s.cache["per_layer"]["0"] = {"hits": 10, "misses": 10}
    monitor.add(s.sample(12.0))  # the first sample is out of the window
    v = monitor.add(s.sample(14.0))
    assert v.window_s == pytest.approx(9.0) and v.layer_hit_rate[0] == pytest.approx(1.0)


def test_restarts_are_seen_and_counter_resets_restart_the_window():
    s = Service()
    monitor = Monitor("http://x")
    s.tokens(0, 100)
    s.cache["bytes_read"] = 5e9
    monitor.add(s.sample(0.0))
    s.actors[1].update(restarts=1, incarnation="c", pid=12, uptime_s=0.5)
    v = monitor.add(s.sample(1.0))
    [compute] = [a for a in v.actors if a.kind == "compute"]
    assert compute.restarts == 1 and compute.pid == 12 and compute.restarted_ago_s == 0.0
    assert "RESTARTED" in render_text(v)
    [engine] = [a for a in v.actors if a.kind == "engine"]
    assert engine.restarted_ago_s is None
    s.cache["bytes_read"] = 1e6  # the cache actor restarted: its counters start again
    v = monitor.add(s.sample(2.0))
    assert v.read_gbps is None and v.window_s == 0.0


def test_a_model_with_every_weight_resident_says_so():
    s = Service()
    v = Monitor("http://x").add(s.sample(0.0, cache=False))
    assert not v.streamed
    text = render_text(v)
    assert "every weight is resident" in text and "engine.0" in text
