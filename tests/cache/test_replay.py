"""The read-ahead admission rule on recorded routing traces (mer.cache.replay): whatever the
disk's speed against the CPU's, reading ahead never reads more than 10% beyond what the cache
alone reads, and never makes a step slower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mer.cache.replay import replay
from mer.cache.trace import RoutingTrace

DATA = Path(__file__).resolve().parents[1] / "data"
EXPERT_BYTES = 100 << 20

# (read bytes per second, CPU seconds per layer): disk-bound as when streaming a model far
# larger than RAM, balanced, and compute-bound as with a fast disk
REGIMES = {
    "disk-bound": (2.5e9, 0.008),
    "balanced": (2.5e9, 0.04),
    "compute-bound": (10e9, 0.05),
}


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory) -> RoutingTrace:
    """A trace with gate predictions recorded by `mer trace record` from a synthetic model."""
    from tests.support.cli import run_mer

    root = tmp_path_factory.mktemp("trace")
    model, out = root / "m.gguf", root / "trace.json"
    assert (
        run_mer("synth", str(model), "--shape", "small", "--histogram-tokens", "0").returncode == 0
    )
    proc = run_mer(
        "trace",
        "record",
        "--model",
        str(model),
        "--prompt",
        "The river ran quietly",
        "--max-tokens",
        "96",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    trace = RoutingTrace.load(out)
    assert any(any(layer) for step in trace.gates for layer in step)
    return trace


def traces(small_trace) -> dict[str, RoutingTrace]:
    found = {"synthetic small (recorded here)": small_trace}
    for path in sorted(DATA.glob("*trace*.json")):
        found[path.stem] = RoutingTrace.load(path)
    return found


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_read_ahead_never_reads_much_more(small_trace, regime, fraction):
    bandwidth, layer_s = REGIMES[regime]
    for name, trace in traces(small_trace).items():
        slots = max(4, round(fraction * trace.n_layers * trace.n_experts))
        args = (trace, slots, EXPERT_BYTES, bandwidth, layer_s)
        ahead, plain = replay(*args, read_ahead=True), replay(*args, read_ahead=False)
        assert ahead.bytes_read <= 1.10 * plain.bytes_read, (name, ahead, plain)
        assert ahead.time_s <= 1.01 * plain.time_s, (name, ahead, plain)
        if ahead.prefetches >= 20:
            assert ahead.precision >= 0.6, (name, ahead)


def test_read_ahead_overlaps_reads_with_compute_on_a_fast_disk(small_trace):
    trace = small_trace
    slots = trace.n_layers * trace.n_experts // 4
    args = (trace, slots, EXPERT_BYTES, *REGIMES["compute-bound"])
    ahead, plain = replay(*args, read_ahead=True), replay(*args, read_ahead=False)
    assert ahead.prefetches > 0 and ahead.stall_s < plain.stall_s
    assert ahead.time_s < plain.time_s


def test_trace_files_round_trip_with_gates(small_trace, tmp_path):
    path = tmp_path / "t.json"
    small_trace.save(path)
    again = RoutingTrace.load(path)
    assert again.steps == small_trace.steps and again.gates == small_trace.gates
    data = json.loads(path.read_text())
    data["gates"][1][1] = [[99, 0]]
    path.write_text(json.dumps(data))
    with pytest.raises(Exception, match="gates"):
        RoutingTrace.load(path)


def test_convert_lays_experts_out_by_a_recorded_trace(tmp_path):
    """`mer trace record` on a model streamed through a small cache, then `mer convert
    --trace`: the store says its layout; a trace that is not one is a one-line error."""
    import json

    from tests.support.cli import run_mer

    model, out = tmp_path / "m.gguf", tmp_path / "trace.json"
    assert (
        run_mer("synth", str(model), "--shape", "tiny", "--histogram-tokens", "0").returncode == 0
    )
    proc = run_mer(
        "trace", "record", "--model", str(model), "--prompt", "The river ran",
        "--max-tokens", "24", "--cache-bytes", "1M", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(RoutingTrace.load(out).steps) >= 24
    proc = run_mer("convert", str(model), str(tmp_path / "store"), "--trace", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["layout"] == "co-use"
    (tmp_path / "bad.json").write_text("{}")
    proc = run_mer(
        "convert", str(model), str(tmp_path / "s2"), "--trace", str(tmp_path / "bad.json")
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "not a routing trace" in proc.stderr
    assert not (tmp_path / "s2").exists()
