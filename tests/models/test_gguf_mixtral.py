"""A tiny random Mixtral converted and quantized by llama.cpp's own tools, read by mer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from sentencepiece import SentencePieceProcessor

import mer
from tests.support import gguf_files, llamacpp
from tests.support.hf_models import (
    CONFIGS,
    build_model,
    hf_logits,
    rel_err,
    save_model,
    train_briefly,
)
from tests.support.tokenizers import write_sentencepiece

# K-quants need rows that are multiples of 256.
CONFIGS["mixtral-gguf"] = dict(
    arch="mixtral",
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
KINDS = ["f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m"]
TEXTS = [
    "the quick brown fox jumps over the lazy dog and runs into the forest where the trees are tall",
    "once upon a time there was a small village by the sea where fishermen told stories every night",
    "numbers like 12345 and 67890 appear in the text, together with symbols such as % & and #",
    "she sells sea shells by the sea shore, and the shells she sells are surely sea shells",
    "a model with many experts routes each token to a few of them and adds their weighted outputs",
    "rain fell on the roof all night long while the wind whistled through the gaps in the old window",
    "the library opens at nine in the morning and closes at six in the evening on most weekdays",
    "water boils at one hundred degrees at sea level, but at lower temperatures on high mountains",
    "to be or not to be, that is the question: whether it is nobler in the mind to suffer",
    "the train left the station on time, crossed the river and reached the city before noon",
]
CONTINUATION = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory, request) -> tuple[object, dict[str, Path]]:
    """(transformers model holding the F16-rounded weights, {kind: gguf path})."""
    root = tmp_path_factory.mktemp("gguf-mixtral")
    hf_dir = root / "hf"
    # A SentencePiece model, as Mixtral ships: the converter keeps its merge scores.
    sp = SentencePieceProcessor(model_file=str(write_sentencepiece(hf_dir)))
    # one embedding row per token of the vocabulary, as llama.cpp requires
    hf = build_model("mixtral-gguf", vocab_size=sp.vocab_size(), init_std=0.03)
    train_briefly(hf, [[sp.bos_id(), *sp.encode(t)] for t in TEXTS])
    save_model(hf, hf_dir, "f16")
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    src = Path(cache.mkdir("llama-cpp-src")) if cache else root / "llama-cpp-src"
    script = llamacpp.converter_script(src)
    paths = {"f16": llamacpp.convert(script, hf_dir, root / "model-f16.gguf", "f16")}
    for kind in KINDS[1:]:
        paths[kind] = llamacpp.quantize(paths["f16"], root / f"model-{kind}.gguf", kind)
    return hf, paths


def prompts(model) -> list[list[int]]:
    out = []
    for text in TEXTS:
        ids = model.tokenizer.encode(text)
        while len(ids) < 64:
            ids = ids + model.tokenizer.encode(" " + text, add_special_tokens=False)
        out.append(ids)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_agrees_with_llamacpp(files, kind):
    _, paths = files
    model = mer.load_model(paths[kind])
    llm = llamacpp.load(paths[kind], n_ctx=256)
    tops, kls = [], []
    for ids in prompts(model):
        seq = ids + llamacpp.greedy(llm, ids, CONTINUATION)
        top1, kl = llamacpp.agreement(model.logits(seq), llamacpp.logits(llm, seq))
        tops.append(top1)
        kls.append(kl)
    print(
        f"tiny Mixtral {kind} vs llama.cpp: top-1 {np.mean(tops):.4f}, mean KL {np.mean(kls):.5f}"
    )
    assert np.mean(tops) >= 0.97
    assert np.mean(kls) <= 0.01


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
    kinds = {e.gate.kind for e in mer.load_model(paths["q4_k_m"]).weights.layers[0].experts}
    assert kinds <= {"q4_k", "q5_k", "q6_k"}
    assert mer.load_model(paths["q5_k_m"]).weights.lm_head.kind == "q6_k"


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
