"""Routing traces from a real model run, and the three policies simulated on them."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from mer.cache.trace import RoutingTrace, simulate_belady, simulate_lru, simulate_mer
from tests.support.hf_models import build_model, save_model
from tests.support.tokenizers import write_tokenizer


def test_belady_on_a_textbook_sequence():
    seq = [(0, e) for e in [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]]
    assert simulate_belady(seq, 3) == pytest.approx(5 / 12)  # 7 misses, the known optimum
    assert simulate_lru(seq, 3) == pytest.approx(2 / 12)  # 10 misses


@pytest.mark.parametrize("seed", range(20))
def test_belady_bounds_online_policies(seed):
    rng = random.Random(seed)
    keys = [(rng.randrange(3), rng.randrange(6)) for _ in range(300)]
    for capacity in (2, 5, 9):
        best = simulate_belady(keys, capacity)
        assert simulate_lru(keys, capacity) <= best + 1e-12
        assert simulate_mer(keys, capacity) <= best + 1e-12


def test_mer_replay_leases_a_visit_even_when_it_does_not_fit():
    # three experts per layer visit, two slots: the replay releases computed experts early
    seq = [(layer, e) for _ in range(20) for layer in range(3) for e in (0, 1, 2)]
    assert simulate_mer(seq, 2) == simulate_lru(seq, 2) == 0.0
    assert simulate_mer(seq, 4) > 0.1
    assert simulate_mer(seq, 9) == pytest.approx(1 - 9 / len(seq))  # only cold misses


def test_record_and_simulate_from_a_model_run(tmp_path):
    model_dir = tmp_path / "model"
    save_model(build_model("mixtral-mqa-window"), model_dir)
    write_tokenizer(model_dir, "chatml")
    out = tmp_path / "trace.json"
    cmd = [
        sys.executable,
        "-m",
        "mer.cli",
        "trace",
        "record",
        "--model",
        str(model_dir),
        "--prompt",
        "hello there",
        "--max-tokens",
        "20",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    trace = RoutingTrace.load(out)
    assert trace.n_layers == 2 and trace.n_experts == 8
    assert len(trace.steps) == 20  # the prefill, then 19 decode steps
    assert all(len(step) == 2 and all(1 <= len(es) <= 8 for es in step) for step in trace.steps)
    assert all(len(es) == 2 for step in trace.steps[1:] for es in step)  # top-2 of one token
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mer.cli",
            "trace",
            "simulate",
            str(out),
            "--capacity",
            "0.25",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.strip().splitlines()[-2:]
    for row in rows:
        lru, ours, best = (float(v) for v in row.split()[2:5])
        assert lru <= best and ours <= best
