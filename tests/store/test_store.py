"""`mer convert` and the store format: same model as the source, and bad stores rejected at
load with one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mer
from mer.errors import MerError, ModelFormatError
from mer.models.sources import resolve_model
from mer.sampling import SamplingParams
from mer.store.convert import convert

IDS = list(range(3, 60))


def test_store_holds_the_same_model(hf_mixtral, q4_store):
    """Resident experts from the store are the bytes the source gives when quantized on load."""
    ref = mer.load_model(hf_mixtral, quant="q4_0").logits(IDS)
    got = mer.load_model(q4_store).logits(IDS)
    np.testing.assert_array_equal(got, ref)


def test_manifest_describes_every_expert(q4_store):
    manifest = json.loads((q4_store / "manifest.json").read_text())
    cfg = manifest["config"]
    entries = manifest["experts"]["entries"]
    assert manifest["format"] == "mer-store" and manifest["version"] == 1
    assert manifest["activations"] == "q8"  # the default: experts packed for the integer kernels
    assert len(entries) == cfg["n_layers"] * cfg["n_experts"] == 16
    size = (q4_store / "experts.bin").stat().st_size
    for entry in entries:
        assert entry["offset"] % 4096 == 0
        assert entry["kinds"] == ["q4_0x16", "q4_0x16", "q4_0x16"]
        assert entry["offset"] + entry["length"] <= size
        int(entry["xxh3"], 16)
    assert (q4_store / "tokenizer.json").is_file()


def test_unquantized_store_and_tokenizer(hf_mixtral, tmp_path):
    convert(hf_mixtral, tmp_path / "s")
    src, store = mer.load_model(hf_mixtral), mer.load_model(tmp_path / "s")
    np.testing.assert_array_equal(store.logits(IDS), src.logits(IDS))
    chat = [{"role": "user", "content": "hello there"}]
    assert store.tokenizer.encode_chat(chat) == src.tokenizer.encode_chat(chat)
    assert store.tokenizer.eos_token_ids == src.tokenizer.eos_token_ids


def test_gguf_store_keeps_tokenizer_and_tokens(tmp_path):
    """The bundled SmolLM2 GGUF (a dense Llama): same tokenizer, chat prompt and greedy text."""
    gguf = resolve_model(None)
    convert(gguf, tmp_path / "smol")
    src, store = mer.load_model(gguf), mer.load_model(tmp_path / "smol")
    for text in ["Hello <|im_start|> world", "  spaces\tand ünïcode 🙂"]:
        assert store.tokenizer.encode(text) == src.tokenizer.encode(text)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert store.tokenizer.render_chat(chat) == src.tokenizer.render_chat(chat)
    assert store.tokenizer.eos_token_ids == src.tokenizer.eos_token_ids
    ids = src.tokenizer.encode_chat(chat)
    greedy = SamplingParams(temperature=0)
    assert list(store.generate(ids, greedy, 12)) == list(src.generate(ids, greedy, 12))


def test_gguf_requantized(gguf_mixtral, tmp_path):
    """--quant re-quantizes K-quant experts to Q8_0: equal to dequantize -> quantize."""
    from mer.kernels.matmul import dequantize, quantize

    _, paths = gguf_mixtral
    convert(paths["q4_k_m"], tmp_path / "s", quant="q8_0", activations="f32")
    src, store = mer.load_model(paths["q4_k_m"]), mer.load_model(tmp_path / "s")
    a, b = src.weights.layers[1].experts[2], store.weights.layers[1].experts[2]
    for w_src, w_store in zip((a.gate, a.up, a.down), (b.gate, b.up, b.down), strict=True):
        assert w_store.kind == "q8_0"
        want = quantize(dequantize(w_src), "q8_0")
        for p, q in zip(want.planes, w_store.planes, strict=True):
            np.testing.assert_array_equal(p, q)


def _copy(store, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(store, dst)
    return dst


def _one_line_error(func, *match):
    with pytest.raises(ModelFormatError) as info:
        func()
    text = str(info.value)
    assert "\n" not in text
    for m in match:
        assert m in text, text
    return text


def test_truncated_experts_file(q4_store, tmp_path):
    bad = _copy(q4_store, tmp_path)
    path = bad / "experts.bin"
    path.write_bytes(path.read_bytes()[:-5000])
    for stream in (None, 1 << 20):
        _one_line_error(
            lambda s=stream: mer.load_model(bad, cache_bytes=s), "experts.bin", "truncated"
        )


def test_truncated_dense_file(q4_store, tmp_path):
    bad = _copy(q4_store, tmp_path)
    path = bad / "dense.bin"
    path.write_bytes(path.read_bytes()[:-1])
    _one_line_error(lambda: mer.load_model(bad), "dense.bin", "truncated")


def test_missing_manifest_entry(q4_store, tmp_path):
    bad = _copy(q4_store, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["experts"]["entries"] = [
        e for e in manifest["experts"]["entries"] if (e["layer"], e["expert"]) != (1, 5)
    ]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(lambda: mer.load_model(bad), "no entry for expert 5 of layer 1")


def test_unknown_version_and_broken_manifest(q4_store, tmp_path):
    bad = _copy(q4_store, tmp_path)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["version"] = 99
    (bad / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(lambda: mer.load_model(bad), "version 99")
    (bad / "manifest.json").write_text("{ not json")
    _one_line_error(lambda: mer.load_model(bad), "manifest.json", "unreadable")


def test_flipped_byte_is_caught_at_resident_load(q4_store, tmp_path):
    bad = _copy(q4_store, tmp_path)
    entry = json.loads((bad / "manifest.json").read_text())["experts"]["entries"][3]
    with open(bad / "experts.bin", "r+b") as fh:
        fh.seek(entry["offset"] + 100)
        byte = fh.read(1)
        fh.seek(entry["offset"] + 100)
        fh.write(bytes([byte[0] ^ 0x10]))
    _one_line_error(
        lambda: mer.load_model(bad),
        f"expert {entry['expert']} of layer {entry['layer']}",
        "checksum mismatch",
    )


def test_convert_refuses_to_overwrite(hf_mixtral, q4_store, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _one_line_error(lambda: convert(hf_mixtral, other), "is not empty and is not a mer store")
    assert (other / "notes.txt").read_text() == "mine"
    _one_line_error(lambda: convert(q4_store, tmp_path / "x"), "already a mer store")


def test_cli_convert_and_generate(hf_mixtral, tmp_path):
    """`mer convert` then `mer generate --cache-bytes`: the same tokens as the source."""
    store = tmp_path / "cli-store"
    run = [sys.executable, "-m", "mer.cli"]
    out = subprocess.run(
        [*run, "convert", str(hf_mixtral), str(store), "--quant", "q8_0"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "16 experts" in out.stdout
    args = ["--prompt", "hello world", "--temperature", "0", "--max-tokens", "8", "--json"]
    ref = subprocess.run(
        [*run, "generate", "--model", str(hf_mixtral), "--quant", "q8_0", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    got = subprocess.run(
        [*run, "generate", "--model", str(store), "--cache-bytes", "100K", "--stats", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(got.stdout)["token_ids"] == json.loads(ref.stdout)["token_ids"]
    stats = json.loads(got.stdout)["stats"]
    assert stats["slots"] >= 1 and stats["misses"] > 0
    bad = subprocess.run(
        [*run, "generate", "--model", str(store), "--cache-bytes", "lots", *args],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a size" in bad.stderr


def test_failed_conversion_leaves_nothing(hf_mixtral, tmp_path, monkeypatch):
    """A conversion that dies midway (here: the disk fills up) removes what it wrote, so the
    next attempt starts clean and nothing half-written is ever loaded."""
    import errno

    import mer.store.convert as conv

    calls = []

    def full_disk(w, quant):
        calls.append(w)
        if len(calls) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        return w

    monkeypatch.setattr(conv, "requantize", full_disk)
    with pytest.raises(MerError, match="no space left on device"):
        convert(hf_mixtral, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    convert(hf_mixtral, tmp_path / "s")
    assert (tmp_path / "s" / "manifest.json").is_file()
