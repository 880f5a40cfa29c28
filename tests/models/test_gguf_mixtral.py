"""A tiny random Mixtral converted and quantized by llama.cpp's own tools, read by mer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import mer
from tests.support import gguf_files, llamacpp
from tests.support.hf_models import hf_logits, rel_err
from tests.support.mixtral_gguf import CONTINUATION, KINDS, TEXTS
from tests.support.mixtral_gguf import prompts as text_prompts


@pytest.fixture(scope="module")
def files(gguf_mixtral) -> tuple[object, dict[str, Path]]:
    """(transformers model holding the F16-rounded weights, {kind: gguf path})."""
    return gguf_mixtral


def prompts(model) -> list[list[int]]:
    return text_prompts(model, 64)


def agreement(model, llm) -> tuple[list[float], list[float]]:
    return llamacpp.teacher_forced(model, llm, prompts(model), CONTINUATION)


@pytest.mark.parametrize("kind", KINDS)
def test_agrees_with_llamacpp(files, kind):
    _, paths = files
    model = mer.load_model(paths[kind])
    llm = llamacpp.load(paths[kind], n_ctx=256)
    tops, kls = agreement(model, llm)
    print(
        f"tiny Mixtral {kind} vs llama.cpp: top-1 {np.mean(tops):.4f}, mean KL {np.mean(kls):.5f}"
    )
    assert np.mean(tops) >= 0.97
    # A prompt's KL is a mean over its positions, and one position where a near-tie in the
    # router picks another expert (llama.cpp rounds activations to 8 bits first) can lift it
    # to a few hundredths; typical prompts sit near 1e-4, so the median is held tight.
    assert np.median(kls) <= 0.002, [round(k, 4) for k in kls]
    assert np.mean(kls) <= 0.02, [round(k, 4) for k in kls]


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_k_m", "q5_k_m"])
def test_q8_activations_agree_with_llamacpp_closer_than_f32(files, kind):
    # 8-bit activations are what llama.cpp multiplies these weights with: every product is
    # then the same up to float summation order, and the logits come closer than f32's.
    _, paths = files
    llm = llamacpp.load(paths[kind], n_ctx=256)
    q8 = mer.load_model(paths[kind], activations="q8")
    integer = kind.replace("_m", "") + "x16"
    assert q8.weights.layers[0].experts[0].gate.kind == integer
    assert q8.weights.layers[0].wq.kind == integer
    tops, kls = agreement(q8, llm)
    _, f32_kls = agreement(mer.load_model(paths[kind], activations="f32"), llm)
    print(
        f"tiny Mixtral {kind}, q8 activations, vs llama.cpp: top-1 {np.mean(tops):.4f}, "
        f"KL mean {np.mean(kls):.5f} median {np.median(kls):.5f} (f32: median "
        f"{np.median(f32_kls):.5f})"
    )
    assert np.mean(tops) >= 0.99
    assert np.median(kls) <= 0.002, [round(k, 4) for k in kls]
    assert np.mean(kls) <= 0.02, [round(k, 4) for k in kls]  # router near-ties, as above
    assert np.median(kls) < np.median(f32_kls)


def test_q8_store_streams_bit_identical(files, tmp_path):
    # `mer convert --activations q8` writes the interleaved layout: streamed experts are read
    # into the cache as the kernels want them, and the logits are the in-RAM model's.
    _, paths = files
    store = tmp_path / "store"
    run = [sys.executable, "-m", "mer.cli"]
    proc = subprocess.run(
        [*run, "convert", str(paths["q4_0"]), str(store), "--activations", "q8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    resident = mer.load_model(paths["q4_0"], activations="q8")
    ids = prompts(resident)[0]
    args, expert = resident.args, resident.weights.layers[0].experts[0]
    total = (
        args.n_layers
        * args.n_experts
        * sum(w.nbytes for w in (expert.gate, expert.up, expert.down))
    )
    streamed = mer.load_model(store, cache_bytes=total // 4)
    try:
        np.testing.assert_array_equal(streamed.logits(ids), resident.logits(ids))
        assert streamed.expert_stats()["misses"] > 0
    finally:
        streamed.close()
    # a store is packed for one mode: asking for the other is one line naming the fix
    proc = subprocess.run(
        [*run, "generate", "--model", str(store), "--prompt", "hi", "--activations", "f32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "convert" in lines[0] and "--activations f32" in lines[0], lines


def test_tokenizer_matches_llamacpp(files):
    _, paths = files
    model = mer.load_model(paths["q8_0"])
    llm = llamacpp.load(paths["q8_0"], n_ctx=256)
    for text in [*TEXTS, "Ünïcödé → 🙂 tokens", "  leading spaces\nand\ttabs"]:
        assert model.tokenizer.encode(text) == llm.tokenize(
            text.encode(), add_bos=True, special=True
        )


def test_f16_file_agrees_with_transformers(files):
    hf, paths = files
    model = mer.load_model(paths["f16"])
    assert model.weights.layers[0].experts[0].gate.kind == "f16"
    for ids in prompts(model)[:4]:
        assert rel_err(model.logits(ids), hf_logits(hf, ids)) <= 1e-3


def test_k_quant_files_use_k_blocks(files):
    _, paths = files
    for activations, x16 in (("f32", ""), ("q8", "x16")):
        model = mer.load_model(paths["q4_k_m"], activations=activations)
        kinds = {e.gate.kind for e in model.weights.layers[0].experts}
        assert kinds <= {"q4_k" + x16, "q5_k", "q6_k" + x16}
        model = mer.load_model(paths["q5_k_m"], activations=activations)
        assert model.weights.lm_head.kind == "q6_k" + x16


def test_per_expert_layout_gives_same_logits(files, tmp_path):
    _, paths = files
    stacked = mer.load_model(paths["q4_k_m"])
    legacy = mer.load_model(
        gguf_files.rewrite(
            paths["q4_k_m"], tmp_path / "legacy.gguf", tensors=gguf_files.split_experts
        )
    )
    ids = prompts(stacked)[0]
    np.testing.assert_array_equal(legacy.logits(ids), stacked.logits(ids))


def assert_load_error(path: Path, *needles: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mer.cli", "generate", "--model", str(path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_truncated_gguf(files, tmp_path):
    data = files[1]["q4_0"].read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) * 2 // 3])
    assert_load_error(bad, "truncated.gguf", "truncated")


def test_wrong_magic(files, tmp_path):
    data = files[1]["q4_0"].read_bytes()
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    assert_load_error(bad, "magic.gguf", "not a GGUF file")


def test_unknown_architecture(files, tmp_path):
    bad = gguf_files.rewrite(
        files[1]["q4_0"], tmp_path / "arch.gguf", {"general.architecture": "mamba9"}
    )
    assert_load_error(bad, "arch.gguf", "mamba9")


def test_unsupported_block_type(files, tmp_path):
    def to_iq4_nl(name, data, qtype):
        if name == "blk.0.attn_q.weight":  # same 18-byte blocks as Q4_0, a type mer lacks
            qtype = gguf.GGMLQuantizationType.IQ4_NL
        yield name, data, qtype

    bad = gguf_files.rewrite(files[1]["q4_0"], tmp_path / "iq.gguf", tensors=to_iq4_nl)
    assert_load_error(bad, "iq.gguf", "blk.0.attn_q.weight", "IQ4_NL")


def test_dequantize_equals_gguf_on_every_file_tensor(files):
    from gguf.quants import dequantize as gguf_dequantize

    from mer.io.gguf import GGUFFile
    from mer.kernels.matmul import dequantize, from_gguf_blocks
    from mer.models.sources import resolve_model

    seen = set()
    for path in [*files[1].values(), resolve_model(None)]:
        gg = GGUFFile(path)
        for name, t in gg.tensors.items():
            raw, kind = gg.tensor(name)
            if kind in ("f32", "f16", "bf16"):
                continue
            rows = raw.reshape(-1, raw.shape[-1])
            cols = int(t.shape[0])
            if rows.shape[0] > 4096:  # the 49152-row SmolLM2 embedding: a slice is enough
                rows = rows[:4096]
            expected = gguf_dequantize(np.ascontiguousarray(rows), t.tensor_type)
            got = dequantize(from_gguf_blocks(rows, kind, rows.shape[0], cols))
            np.testing.assert_array_equal(got, expected.reshape(rows.shape[0], cols), err_msg=name)
            seen.add(kind)
    assert seen >= {"q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"}
