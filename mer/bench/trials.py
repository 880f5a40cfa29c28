"""Trials: each configuration run in a fresh process, engines alternating, repeated until each
has enough clean trials (others used at most `clean` of the CPUs while it ran).

A configuration is a worker spec (`mer.bench.workers`) plus how to run it: under a memory
cap (`mer.bench.cgroup`) and after dropping the page cache, for the larger-than-memory
scenario. A trial that fails is recorded with its reason (a killed process under a cap is
reported as out of memory); a configuration that fails twice is not tried again.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from mer.bench.cgroup import MemoryCap, drop_page_cache
from mer.bench.machine import Share, block_device, disk_read_bytes


@dataclass
class Config:
    name: str  # a row of the results ("mer store, 6 GiB cache")
    scenario: str
    engine: str  # "mer" or "llama.cpp"
    spec: dict  # the worker's spec (mer.bench.workers)
    cap_bytes: int | None = None  # run under a memory cap of this many bytes
    drop_cache: bool = False  # drop the page cache before each trial
    timeout_s: float = 3600.0  # a trial that runs longer is stopped: a failure, not a figure


@dataclass
class Trial:
    figures: dict | None  # the worker's figures, or None when it failed
    error: str | None
    others: float  # share of the CPUs others used during the trial
    wall_s: float
    peak_bytes: int | None = None  # the memory cap's peak, page cache included
    device_read_bytes: int = 0  # read from the model's disk during the whole trial

    def clean(self, limit: float) -> bool:
        return self.figures is not None and self.others <= limit


@dataclass
class Results:
    configs: dict[str, Config] = field(default_factory=dict)
    trials: dict[str, list[Trial]] = field(default_factory=dict)

    def clean(self, name: str, limit: float) -> list[Trial]:
        return [t for t in self.trials.get(name, []) if t.clean(limit)]

    def summary(self, name: str, figure: str, limit: float) -> dict | None:
        """min / median / max of `figure` over the clean trials of `name`."""
        values = [t.figures.get(figure) for t in self.clean(name, limit)]
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {
            "min": min(values),
            "median": statistics.median(values),
            "max": max(values),
            "n": len(values),
        }

    def failure(self, name: str) -> str | None:
        errors = [t.error for t in self.trials.get(name, []) if t.error]
        return errors[-1] if errors and not self.clean(name, 1.0) else None

    def to_json(self) -> dict:
        return {
            name: {"config": asdict(self.configs[name]), "trials": [asdict(t) for t in trials]}
            for name, trials in self.trials.items()
        }


def run_trial(config: Config) -> Trial:
    """One trial of `config` in a fresh worker process (stopped after config.timeout_s)."""
    cmd = [sys.executable, "-m", "mer.bench.workers", json.dumps(config.spec)]
    if config.drop_cache:
        drop_page_cache()
    device = block_device_of(config.spec["model"])
    read0 = disk_read_bytes(device)
    start = time.monotonic()
    peak = None
    try:
        with Share() as share:
            if config.cap_bytes:
                with MemoryCap(config.cap_bytes) as cap:
                    proc = cap.run(cmd, capture_output=True, text=True, timeout=config.timeout_s)
                    peak = cap.peak_bytes()
            else:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=config.timeout_s)
    except subprocess.TimeoutExpired:  # subprocess.run has killed the worker
        return Trial(
            figures=None,
            error=f"timed out after {config.timeout_s:g} s",
            others=share.others,
            wall_s=time.monotonic() - start,
            device_read_bytes=disk_read_bytes(device) - read0,
        )
    wall = time.monotonic() - start
    lines = proc.stdout.strip().splitlines()
    try:
        figures = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        figures = {}
    error = figures.pop("error", None) if isinstance(figures, dict) else None
    if proc.returncode == -signal.SIGKILL and config.cap_bytes:
        error = f"killed: out of memory under the {config.cap_bytes / 2**30:.2g} GiB cap"
    elif proc.returncode != 0 and error is None:
        tail = " ".join(proc.stderr.strip().splitlines()[-1:])
        error = f"exit {proc.returncode}: {tail}"
    return Trial(
        figures=None if error else figures,
        error=error,
        others=share.others,
        wall_s=wall,
        peak_bytes=peak,
        device_read_bytes=disk_read_bytes(device) - read0,
    )


def block_device_of(path: str) -> str | None:
    from pathlib import Path

    return block_device(Path(path))


def run_rounds(
    configs: list[Config],
    results: Results,
    *,
    min_clean: int,
    max_rounds: int,
    clean: float,
    log: Callable[[str], None],
) -> None:
    """Run `configs` in alternation, round after round, until each has `min_clean` clean
    trials (or failed twice), at most `max_rounds` rounds."""
    for config in configs:
        results.configs[config.name] = config
        results.trials.setdefault(config.name, [])
    for _ in range(max_rounds):
        pending = [
            c
            for c in configs
            if len(results.clean(c.name, clean)) < min_clean
            and sum(t.error is not None for t in results.trials[c.name]) < 2
        ]
        if not pending:
            return
        for config in pending:
            trial = run_trial(config)
            results.trials[config.name].append(trial)
            what = trial.error or ", ".join(
                f"{k} {v:.4g}"
                for k, v in trial.figures.items()
                if k in ("decode_tok_s", "prefill_tok_s", "decode_s_per_token", "bytes_per_token")
                and isinstance(v, int | float)
            )
            log(f"{config.name}: {what} (others {trial.others:.1%}, {trial.wall_s:.0f} s)")
