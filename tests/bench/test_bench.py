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


def test_a_trial_that_overruns_is_a_failure_not_a_crash():
    """llama.cpp's repacking path under a cap smaller than the model can thrash for hours:
    a trial past its time limit is stopped and recorded as failed."""
    from mer.bench.trials import Config, run_trial
    from mer.models.sources import resolve_model

    spec = {
        "kind": "mer",
        "model": str(resolve_model(None)),
        "threads": 1,
        "prompt_ids": [1, 2, 3],
        "decode_tokens": 2,
    }
    trial = run_trial(Config("overrun", "ram", "mer", spec, timeout_s=0.2))
    assert trial.figures is None and trial.error == "timed out after 0.2 s"
    assert not trial.clean(1.0)
