"""Signals at bad moments: a streamed generation killed or stopped leaves no shared memory for
long, and an interrupted re-conversion never loses the store it was replacing."""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

import mer
from tests.support.cli import (
    assert_one_line_error,
    run_mer,
    shm_segments,
    spawn_mer,
    wait_for,
    write_random_mixtral,
)

SHM = Path("/dev/shm")


@pytest.fixture(scope="module")
def endless(q4_store, tmp_path_factory) -> Path:
    """q4_store with a context long enough to generate until killed."""
    store = tmp_path_factory.mktemp("endless") / "store"
    shutil.copytree(q4_store, store)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["config"]["max_seq_len"] = 1 << 20
    (store / "manifest.json").write_text(json.dumps(manifest))
    return store


def _streaming(store: Path):
    """A streamed `mer generate` that is past loading and producing tokens."""
    proc = spawn_mer(
        "generate",
        "--model",
        str(store),
        "--cache-bytes",
        "300K",
        "--prompt",
        "hi",
        "--max-tokens",
        "1000000",
        "--temperature",
        "1",
        "--seed",
        "1",
    )
    wait_for(lambda: shm_segments(proc.pid) or proc.poll() is not None, what="the arena")
    assert proc.poll() is None, proc.stderr.read()
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    assert ready, "no tokens"
    return proc


def test_sigkill_leaves_a_segment_that_the_next_start_removes(endless, q4_store):
    proc = _streaming(endless)
    names = shm_segments(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(60)
    assert names and all((SHM / n).exists() for n in names)
    nxt = run_mer(
        "generate",
        "--model",
        str(q4_store),
        "--cache-bytes",
        "300K",
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    )
    assert nxt.returncode == 0, nxt.stderr
    assert not any((SHM / n).exists() for n in names)
    reclaimed = [line for line in nxt.stderr.splitlines() if "shm_reclaimed" in line]
    assert len(reclaimed) == 1 and str(proc.pid) in reclaimed[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_to_the_process_group_leaves_nothing(endless, sig):
    proc = _streaming(endless)
    os.killpg(proc.pid, sig)  # as a closed terminal or a dropped ssh session does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    assert shm_segments(proc.pid) == []
    assert err.decode().strip() == "", err  # no "leaked shared_memory" warning, no traceback


# -- mer convert --force, interrupted --------------------------------------------------------
@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two different float32 Mixtrals of ~150 MB: converting one takes long enough to be
    interrupted midway."""
    root = tmp_path_factory.mktemp("big")
    shape = dict(n_layers=6, n_experts=16, dim=256, ffn=512)
    return (
        write_random_mixtral(root / "old", seed=1, **shape),
        write_random_mixtral(root / "new", seed=2, **shape),
    )


def _digest(store: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(store.iterdir())}


def _partials(store: Path) -> list[Path]:
    return sorted(store.parent.glob(f".{store.name}.partial.*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_reconversion_keeps_the_old_store(two_models, tmp_path, sig):
    old, new = two_models
    store = tmp_path / "store"
    assert run_mer("convert", str(old), str(store)).returncode == 0
    before = _digest(store)
    proc = spawn_mer("convert", str(new), str(store), "--force", "--quant", "q4_0")

    def writing() -> bool:
        return any(
            p.joinpath("experts.bin").is_file() and p.joinpath("experts.bin").stat().st_size
            for p in _partials(store)
        )

    wait_for(lambda: writing() or proc.poll() is not None, what="the conversion to start")
    os.kill(proc.pid, signal.SIGSTOP)  # hold it midway while we look
    assert proc.poll() is None and _partials(store), "the conversion ended before the signal"
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    proc.wait(120)
    assert proc.returncode == (128 + sig if sig != signal.SIGKILL else -signal.SIGKILL)
    assert _digest(store) == before
    model = mer.load_model(store)
    assert np.isfinite(model.logits([1, 2, 3])).all()
    if sig == signal.SIGKILL:
        (leftover,) = _partials(store)
        # The directory a killed conversion left is recognised for what it is...
        proc = run_mer("generate", "--model", str(leftover), "--prompt", "hi")
        assert_one_line_error(proc, "unfinished mer store")
        proc = run_mer("convert", str(new), str(leftover))
        assert_one_line_error(proc, "unfinished mer store", "--force")
        # ...and the next conversion into the same place clears it.
        assert run_mer("convert", str(new), str(store), "--force").returncode == 0
        assert _partials(store) == [] and _digest(store) != before
    else:
        assert _partials(store) == []


def test_force_replaces_an_unfinished_store(two_models, tmp_path):
    old, _ = two_models
    half = tmp_path / "half"
    half.mkdir()
    (half / "experts.bin.part").write_bytes(b"\0" * 4096)  # as an older mer left them
    proc = run_mer("generate", "--model", str(half), "--prompt", "hi")
    assert_one_line_error(proc, str(half), "unfinished mer store")
    assert_one_line_error(run_mer("convert", str(old), str(half)), "unfinished", "--force")
    assert run_mer("convert", str(old), str(half), "--force").returncode == 0
    assert (half / "manifest.json").is_file() and not (half / "experts.bin.part").exists()
