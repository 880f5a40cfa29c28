"""`mer bench --quick`: every scenario runs both engines and produces every figure, sane
(finite, positive), with its tables and plots. Their sizes are the full run's business."""

from __future__ import annotations

import json

from mer.bench import cgroup
from mer.bench.run import check
from tests.support.cli import run_mer


def test_quick_bench_produces_every_figure(tmp_path):
    out = tmp_path / "results"
    scenarios = ["ram", "disk", "convert"] if cgroup.available() else ["ram"]
    proc = run_mer("bench", "--quick", "--out", str(out), "--scenarios", *scenarios, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert check(report) == []
    markdown = (out / "results.md").read_text()
    assert "## In RAM" in markdown and "mer / llama.cpp" in markdown
    if "disk" in scenarios:
        assert "## Larger than memory" in markdown and "Belady" in markdown
        for plot in ("seconds_per_token.png", "bytes_per_token.png", "hits.png"):
            assert (out / plot).stat().st_size > 1000
        ratios = report["figures"]["disk_ratios"]
        assert ratios["bound_serial_s"] > 0 and ratios["speedup_over_llama_mmap"] > 0
        assert report["convert"]["ok"]
