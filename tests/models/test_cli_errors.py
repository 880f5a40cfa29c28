"""Bad input to the real `mer` command: every kind ends in one stderr line that names the flag
or file, and a non-zero exit; never a traceback, never silence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.support.cli import MER, assert_one_line_error, run_mer
from tests.support.hf_models import build_model, save_model
from tests.support.tokenizers import write_tokenizer

NOWHERE = "/nonexistent/model"  # flag errors must be found before any model is opened


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny")
    save_model(build_model("mixtral-base"), directory, "f32")
    write_tokenizer(directory, "chatml")
    return directory


@pytest.fixture(scope="module")
def tiny_store(tiny, tmp_path_factory) -> Path:
    from mer.store.convert import convert

    path = tmp_path_factory.mktemp("tiny-store") / "store"
    convert(tiny, path, quant="q8_0")
    return path


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--max-seq-len", "0"], "--max-seq-len"),
        (["--max-seq-len", "-5"], "--max-seq-len"),
        (["--max-tokens", "-1"], "--max-tokens"),
        (["--max-tokens", "ten"], "--max-tokens"),
        (["--cache-bytes", "inf"], "--cache-bytes"),
        (["--cache-bytes", "1e400"], "--cache-bytes"),
        (["--cache-bytes", "nan"], "--cache-bytes"),
        (["--cache-bytes", "0"], "--cache-bytes"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-p", "0"], "--top-p"),
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "-1"], "--temperature"),
        (["--min-p", "2"], "--min-p"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--seed", "-1"], "--seed"),
        (["--threads", "0"], "--threads"),
        (["--threads", "100000"], "--threads"),
        (["--system", "Be brief."], "--system"),
        (["--io-backend", "uring"], "--io-backend"),
        (["--quant", "q2"], "--quant"),
    ],
)
def test_flag_errors_name_the_flag(args, flag):
    proc = run_mer("generate", "--model", NOWHERE, "--prompt", "hi", *args)
    assert_one_line_error(proc, flag, code=2)


def test_empty_prompt_is_rejected_before_loading():
    assert_one_line_error(run_mer("generate", "--model", NOWHERE, "--prompt", ""), "--prompt")


def test_non_utf8_arguments():
    proc = subprocess.run(
        [*MER, "generate", "--model", NOWHERE, "--prompt", b"caf\xe9 \xff"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(proc, "--prompt", "UTF-8", code=2)
    # A path in bytes that are not UTF-8 is still a path: it is named in the error as given.
    proc = subprocess.run(
        [*MER, "generate", "--model", b"/nonexistent/\xff\xfe", "--prompt", "hi"],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.count(b"\n") == 1 and b"/nonexistent/\xff\xfe" in proc.stderr


def test_version_and_help_with_defaults():
    version = run_mer("--version")
    assert version.returncode == 0 and version.stdout.strip().startswith("mer ")
    help_text = run_mer("generate", "--help").stdout
    for expected in ("--max-tokens", "(default: 256)", "(default: 0.7)", "(default: 0.95)"):
        assert expected in help_text


def test_bundled_model_by_the_name_mer_models_prints():
    from mer.models.sources import bundled_models

    src = bundled_models()[0]
    if src.path is None:
        pytest.skip("the bundled model is not installed")
    assert src.name in run_mer("models").stdout
    proc = run_mer("generate", "--model", src.name, "--prompt", "Hi", "--max-tokens", "2")
    assert proc.returncode == 0, proc.stderr


# -- files and the operating system ------------------------------------------------------------
def test_missing_model_and_missing_parent(tiny, tmp_path):
    assert_one_line_error(run_mer("generate", "--model", NOWHERE, "--prompt", "hi"), NOWHERE)
    out = tmp_path / "no" / "such" / "dir" / "trace.json"
    proc = run_mer("trace", "record", "--model", str(tiny), "--prompt", "hi", "--out", str(out))
    assert_one_line_error(proc, "--out", str(out), "no such file")


def test_a_file_where_a_directory_should_be(tiny, tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run_mer("convert", str(tiny), str(tmp_path / "afile" / "store"))
    assert_one_line_error(proc, "afile", "a file is in the way")
    assert (tmp_path / "afile").read_text() == "x"
    proc = run_mer("convert", str(tiny), str(tmp_path / "afile"))
    assert_one_line_error(proc, "afile", "a file is in the way")


def test_disk_full(tiny, tmp_path):
    proc = run_mer(
        "trace",
        "record",
        "--model",
        str(tiny),
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
        "--out",
        "/dev/full",
    )
    assert_one_line_error(proc, "/dev/full", "no space left")
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        proc = run_mer("convert", str(tiny), str(small / "store"))
        assert_one_line_error(proc, str(small / "store"), "no space left")
        assert list(small.iterdir()) == []  # the partial store is gone
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_permission_denied(tiny, tmp_path):
    """A model directory mer may not read, and a store directory it may not write: root is
    made an ordinary user by dropping the capabilities that let it ignore permissions."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and util-linux's setpriv")
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search"]
    locked = tmp_path / "locked"
    shutil.copytree(tiny, locked)
    locked.chmod(0)
    try:
        proc = subprocess.run(
            [*drop, *MER, "generate", "--model", str(locked), "--prompt", "hi"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert_one_line_error(proc, str(locked), "permission denied")
        proc = subprocess.run(
            [*drop, *MER, "convert", str(tiny), str(locked / "store")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert_one_line_error(proc, str(locked), "permission denied")
    finally:
        locked.chmod(0o755)


def test_broken_pipe(tiny):
    proc = subprocess.Popen(
        [
            *MER,
            "generate",
            "--model",
            str(tiny),
            "--prompt",
            "hi",
            "--max-tokens",
            "500",
            "--max-seq-len",
            "1024",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.read(1)  # like `| head -c 1`: take a byte and hang up
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 141
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "broken pipe" in lines[0], err


# -- mer trace ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trace_file(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trace") / "trace.json"
    proc = run_mer(
        "trace",
        "record",
        "--model",
        str(tiny),
        "--prompt",
        "hi",
        "--max-tokens",
        "8",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("capacity", ["0", "-1", "1.5", "inf", "nan", "-0.25"])
def test_trace_simulate_rejects_bad_capacities(trace_file, capacity):
    proc = run_mer("trace", "simulate", str(trace_file), "--capacity", "0.5", capacity)
    assert_one_line_error(proc, "--capacity")
    assert proc.stdout == ""  # nothing printed for the good capacity before the bad one


def test_trace_simulate_takes_fractions_and_slots(trace_file):
    proc = run_mer("trace", "simulate", str(trace_file), "--capacity", "0.5", "3")
    assert proc.returncode == 0, proc.stderr
    assert "Belady" in proc.stdout


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00garbage",
        b"{ not json",
        b"[1, 2, 3]",
        b'{"n_layers": "two", "n_experts": 4, "steps": []}',
        b'{"n_layers": 2, "n_experts": 4, "steps": [[[0, 9]]]}',
        b'{"n_layers": 2, "n_experts": 4, "steps": [[[0, 1], [2], [3]]]}',
        b'{"n_layers": 2, "n_experts": 4, "steps": "many"}',
        b'{"n_layers": 2, "n_experts": 4, "steps": [[["a"]]]}',
    ],
)
def test_malformed_trace_files(tmp_path, content):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    assert_one_line_error(run_mer("trace", "simulate", str(bad)), str(bad), "routing trace")


# -- stores with a manifest of the wrong shape ---------------------------------------------------
def _edit_manifest(store: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "bad-store"
    shutil.copytree(store, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def _set(path: str, value):
    """Set the manifest value at `path`: keys joined by "/" (dense tensor names hold dots)."""

    def edit(manifest):
        *parents, last = path.split("/")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        _set("config/dim", "wide"),
        _set("config/n_layers", 2.5),
        _set("config/tie_embeddings", "yes"),
        _set("config/rope", [1, 2]),
        _set("config/bogus", 1),
        _set("experts", []),
        _set("experts/entries", "all of them"),
        _set("experts/entries/0", None),
        _set("experts/entries/0/offset", "0"),
        _set("experts/entries/0/layout", 99),
        _set("experts/entries/0/xxh3", 12),
        _set("experts/layouts/0/0/planes/0/shape", [1, 2, 3]),
        _set("experts/layouts/0/0/kind", "q9_9"),
        _set("experts/layouts/0/2/rows", -4),
        _set("dense/tensors/layers.0.wq", {"array": {"offset": 0}}),
        _set("dense/tensors/lm_head/planes/0/offset", 1 << 40),
        _set("dense/tensors/embed/array/shape", [3, 3]),
        _set("dense/xxh3", None),
        _set("tokenizer", "tokenizer.json"),
    ],
)
def test_manifest_with_wrong_types(tiny_store, tmp_path, edit):
    bad = _edit_manifest(tiny_store, tmp_path, edit)
    for extra in ([], ["--cache-bytes", "1M"]):
        proc = run_mer(
            "generate", "--model", str(bad), "--prompt", "hi", "--max-tokens", "2", *extra
        )
        assert_one_line_error(proc, "manifest.json" if "lm_head" not in proc.stderr else "lm_head")


# -- corrupt weights that still parse ------------------------------------------------------------
def test_nan_weights_are_reported_not_computed_on(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(tiny, bad)
    (shard,) = bad.glob("*.safetensors")
    tensors = load_file(shard)
    for name, value in tensors.items():
        if "layers.1." in name and name.endswith("w2.weight"):
            value[:] = np.nan
    save_file(tensors, shard, metadata={"format": "pt"})
    proc = run_mer("generate", "--model", str(bad), "--prompt", "hello there", "--max-tokens", "4")
    assert_one_line_error(proc, "layer 1", "non-finite", str(bad), "corrupt")


# -- silent surprises -----------------------------------------------------------------------------
def test_running_out_of_context_is_said(tiny):
    args = ["generate", "--model", str(tiny), "--prompt", "hi there", "--max-seq-len", "64"]
    proc = run_mer(*args, "--max-tokens", "500", "--temperature", "1", "--seed", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["finish_reason"] == "context"
    assert len(out["prompt_ids"]) + len(out["token_ids"]) == 64
    text = run_mer(*args, "--max-tokens", "500", "--temperature", "1", "--seed", "3")
    assert "context full at 64 tokens" in text.stderr.strip().splitlines()[-1]
    short = run_mer(*args, "--max-tokens", "3", "--temperature", "1", "--seed", "3", "--json")
    assert json.loads(short.stdout)["finish_reason"] == "length"
    too_long = run_mer(
        "generate", "--model", str(tiny), "--prompt", "word " * 80, "--max-seq-len", "16"
    )
    assert_one_line_error(too_long, "prompt", "context of 16 tokens")
