"""The streaming tier's telemetry (`ExpertStreamer.telemetry()`) as a table for people."""

from __future__ import annotations


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _ratio(ours: float, best: float) -> str:
    return f"we read {ours / best:.2f}x" if best else "nothing to read"


def stats_table(st: dict) -> str:
    """Several lines: acquires per layer split into ready hits, in-flight hits and misses;
    bytes read, speed, stalls and latencies; read-ahead and predictor quality."""
    head = (
        f"expert cache: {st['slots']} slots of {_bytes(st['slot_bytes'])}, "
        f"{st['backend']} reads; {st['tokens']} tokens in {st['steps']} forward passes"
    )
    lines = [head, f"{'':>10}{'acquires':>10}{'ready':>9}{'in flight':>11}{'missed':>9}"]

    def row(name: str, hits: int, inflight: int, misses: int) -> str:
        total = hits + inflight + misses
        return (
            f"{name:>10}{total:>10}{_pct(hits, total):>9}"
            f"{_pct(inflight, total):>11}{_pct(misses, total):>9}"
        )

    lines.append(row("all", st["hits"], st["inflight_hits"], st["misses"]))
    for layer, c in sorted(st["per_layer"].items(), key=lambda kv: int(kv[0])):
        lines.append(row(f"layer {layer}", c["hits"], c["inflight_hits"], c["misses"]))
    lines += [
        f"read {_bytes(st['bytes_read'])} ({_bytes(st['bytes_per_token'])} per token) at "
        f"{st['read_gbps']:.2f} GB/s; forward pass stalled on reads {st['stall_s']:.3f} s; "
        f"in-flight hits waited {st['inflight_wait_s']:.3f} s",
        f"Belady's MIN, on the same routing with the same slots, would read "
        f"{_bytes(st['belady_bytes'])} ({_ratio(st['bytes_read'], st['belady_bytes'])} of that)",
        f"cold reads: p50 {st['cold_read_ms_p50']:.2f} ms, p99 {st['cold_read_ms_p99']:.2f} ms "
        f"({st['demand_reads']} on demand)",
        f"read-ahead: {st['prefetches']} issued, precision {st['prefetch_precision']:.2f}, "
        f"recall {st['prefetch_recall']:.2f}, wasted {_bytes(st['prefetch_wasted_bytes'])}",
        f"predictors: gate lookahead precision {st['gate_precision']:.2f} recall "
        f"{st['gate_recall']:.2f}; Markov precision {st['markov_precision']:.2f} recall "
        f"{st['markov_recall']:.2f}",
    ]
    return "\n".join(lines)
