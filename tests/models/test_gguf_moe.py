"""Qwen3-MoE, OLMoE, DeepSeek (deepseek2) and gpt-oss GGUF files made by llama.cpp's converter and quantizer, read by mer:
the same logits as llama.cpp (top-1, KL) and, from the F16 file, as transformers."""

from __future__ import annotations

import numpy as np
import pytest

import mer
from tests.support import llamacpp
from tests.support.hf_models import hf_logits, rel_err
from tests.support.mixtral_gguf import CONTINUATION
from tests.support.mixtral_gguf import prompts as text_prompts
from tests.support.moe_gguf import EXTRA_KINDS, KINDS

ARCHS = ["qwen3moe", "olmoe", "deepseek2", "gptoss"]
CASES = [(arch, kind) for arch in ARCHS for kind in KINDS + EXTRA_KINDS.get(arch, [])]


# llama.cpp rounds activations to 8 bits before each product of a quantized matrix; DeepSeek's
# latent attention adds two rounded per-head products (into and out of the latent) to every
# layer, so its quantized files drift further from mer's float32 activations (its F16 file
# agrees to a KL of 1e-5)
MEDIAN_KL = {"deepseek2": 0.004}


def prompts(model) -> list[list[int]]:
    return text_prompts(model, 48)


@pytest.mark.parametrize("arch,kind", CASES)
def test_agrees_with_llamacpp(gguf_moe, arch, kind):
    _, paths = gguf_moe(arch)
    model = mer.load_model(paths[kind])
    assert model.args.arch == arch
    llm = llamacpp.load(paths[kind], n_ctx=256)
    tops, kls = llamacpp.teacher_forced(model, llm, prompts(model), CONTINUATION)
    print(f"tiny {arch} {kind} vs llama.cpp: top-1 {np.mean(tops):.4f}, mean KL {np.mean(kls):.5f}")
    assert np.mean(tops) >= 0.97
    assert np.median(kls) <= MEDIAN_KL.get(arch, 0.002), [round(k, 4) for k in kls]
    assert np.mean(kls) <= 0.02, [round(k, 4) for k in kls]


def truncated_yarn(hf):
    """A copy of gpt-oss model `hf` whose YaRN rounds the blended band of frequencies to
    whole dimensions, as ggml's rope always does (gpt-oss's config says `truncate: false`;
    that alone moves the logits by ~1e-3, so mer reads the GGUF file as llama.cpp runs it)."""
    import copy

    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    hf = copy.deepcopy(hf)
    hf.config.rope_parameters = {**hf.config.rope_parameters, "truncate": True}
    hf.model.rotary_emb = GptOssRotaryEmbedding(hf.config)
    return hf


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_file_agrees_with_transformers(gguf_moe, arch):
    hf, paths = gguf_moe(arch)
    if arch == "gptoss":
        hf = truncated_yarn(hf)
    model = mer.load_model(paths["f16"])
    layer = model.weights.layers[0]
    assert layer.q_norm is not None or layer.mla is not None or layer.sinks is not None
    for ids in prompts(model)[:3]:
        assert rel_err(model.logits(ids), hf_logits(hf, ids)) <= 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_streams_from_the_gguf_file(gguf_moe, arch, tmp_path):
    """Streamed at a quarter of the experts, straight from the file and (DeepSeek: dense first
    layer and shared expert kept with the dense weights) from a store made of it."""
    _, paths = gguf_moe(arch)
    resident = mer.load_model(paths["q4_k_m"])
    ids = prompts(resident)[0]
    experts = sum(
        w.gguf_nbytes for layer in resident.weights.layers for e in layer.experts
        for w in (e.gate, e.up, e.down)
    )  # fmt: skip
    with mer.load_model(paths["q4_k_m"], cache_bytes=experts // 4) as streamed:
        np.testing.assert_array_equal(streamed.logits(ids), resident.logits(ids))
    if arch == "deepseek2":
        from mer.store.convert import convert

        convert(paths["q4_k_m"], tmp_path / "store")
        with mer.load_model(tmp_path / "store", cache_bytes=experts // 4) as streamed:
            np.testing.assert_array_equal(streamed.logits(ids), resident.logits(ids))


def test_qwen2moe_file_agrees_with_transformers_and_llamacpp(tmp_path, request):
    """A Qwen2-MoE model (gated shared expert, q/k/v biases) through llama.cpp's converter:
    mer reads the F16 file as transformers computes it and as llama.cpp does."""
    from pathlib import Path

    from tests.support.hf_models import build_model, save_model
    from tests.support.tokenizers import write_smollm2_tokenizer

    hf_dir = tmp_path / "hf"
    vocab = write_smollm2_tokenizer(hf_dir)
    hf = build_model("qwen2moe-base", vocab_size=vocab, init_std=0.05)
    save_model(hf, hf_dir, "f16")
    cache = Path(request.config.cache.mkdir("llama-cpp-src"))
    [path] = llamacpp.gguf_files(hf_dir, tmp_path, cache, ["f16"]).values()
    model = mer.load_model(path)
    assert model.args.arch == "qwen2moe" and model.weights.layers[0].shared_gate is not None
    llm = llamacpp.load(path, n_ctx=256)
    for ids in prompts(model)[:3]:
        got = model.logits(ids)
        assert rel_err(got, hf_logits(hf, ids)) <= 1e-3
        top1, kl = llamacpp.agreement(got, llamacpp.logits(llm, ids))
        assert top1 >= 0.97 and kl <= 1e-3, (top1, kl)


def test_gptoss_file_errors_and_window_patterns(gguf_moe, tmp_path):
    """A gpt-oss file missing its sinks or an expert bias, or whose per-layer window flags do
    not cover the layers, is a one-line error naming it; flags that do are read per layer."""
    import gguf

    from mer.errors import ModelFormatError
    from tests.support.gguf_files import rewrite

    _, paths = gguf_moe("gptoss")
    src = paths["q8_0"]

    def without(name: str):
        def drop(tensor, data, qtype):
            if tensor != name:
                yield tensor, data, qtype

        return drop

    for name in ("blk.1.attn_sinks.weight", "blk.0.ffn_down_exps.bias"):
        bad = rewrite(src, tmp_path / "bad.gguf", tensors=without(name))
        with pytest.raises(ModelFormatError, match=f"{name} is missing"):
            mer.load_model(bad)
    # llama.cpp's converter writes no pattern: every other layer slides, from the first
    assert mer.load_model(src).args.full_attention_layers == (1,)
    key = "gpt-oss.attention.sliding_window_pattern"
    assert key not in gguf.GGUFReader(src).fields
    flags = rewrite(src, tmp_path / "flags.gguf", meta={key: [False, True]})  # full, sliding
    with pytest.raises(ModelFormatError, match="sliding_window_pattern"):
        mer.load_model(rewrite(src, tmp_path / "short.gguf", meta={key: [True]}))
    assert mer.load_model(flags).args.full_attention_layers == (0,)
