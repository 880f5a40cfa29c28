"""gpt-oss as OpenAI publishes it: experts as MXFP4 blocks and exponents in safetensors
(`*_blocks`, `*_scales`), read without rounding, exactly as transformers dequantizes them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from safetensors.numpy import load_file, save_file

import mer
from mer.kernels.matmul import dequantize
from tests.support.cli import assert_one_line_error, run_mer
from tests.support.hf_models import build_model, hf_logits, rel_err, save_model

IDS = [3, 17, 99, 250, 7, 1, 42, 300, 5, 61, 12, 480]


def to_openai(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [R, C] -> OpenAI's MXFP4 (blocks uint8 [R, C/32, 16], exponents [R, C/32]),
    through ggml's quantizer: GGUF's nibble order (byte i: weights i, 16 + i) rewritten as
    OpenAI's (byte j: weights 2j, 2j + 1)."""
    r, c = w.shape
    ggml = quantize(w, GGMLQuantizationType.MXFP4).reshape(r, c // 32, 17)
    low, high = ggml[..., 1:] & 0x0F, ggml[..., 1:] >> 4
    values = np.concatenate([low, high], axis=-1)  # weight order
    blocks = values[..., 0::2] | (values[..., 1::2] << 4)
    return np.ascontiguousarray(blocks), np.ascontiguousarray(ggml[..., 0])


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(transformers model computing with the dequantized experts, MXFP4 directory)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    root = tmp_path_factory.mktemp("gptoss-mxfp4")
    model = build_model("gptoss-base", seed=3)
    path = save_model(model, root / "hf", "f32")
    tensors = load_file(path / "model.safetensors")
    params = dict(model.named_parameters())
    for layer in range(model.config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        for name in ("gate_up_proj", "down_proj"):
            stored = tensors.pop(p + name)  # [E, in, out]: rows of the product are columns
            packed = [to_openai(np.ascontiguousarray(m.T)) for m in stored]
            blocks = np.stack([b for b, _ in packed])
            scales = np.stack([s for _, s in packed])
            tensors[p + name + "_blocks"], tensors[p + name + "_scales"] = blocks, scales
            values = convert_moe_packed_tensors(
                torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
            )
            with torch.no_grad():
                params[p + name].copy_(values)  # already [E, in, out]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config))
    return model, path


def test_logits_match_transformers_on_the_dequantized_experts(published):
    model, path = published
    ours = mer.load_model(path, activations="f32")  # transformers' float arithmetic
    assert ours.weights.layers[0].experts[0].gate.kind == "mxfp4"
    assert rel_err(ours.logits(IDS), hf_logits(model, IDS)) <= 1e-4
    # with 8-bit activations (the default): the integer kernel, the same weights
    q8 = mer.load_model(path)
    assert q8.weights.layers[0].experts[0].gate.kind == "mxfp4x16"
    got, want = (dequantize(m.weights.layers[1].experts[5].gate) for m in (q8, ours))
    np.testing.assert_array_equal(got, want)
    assert rel_err(q8.logits(IDS), hf_logits(model, IDS)) <= 0.05
    # each expert matrix holds exactly the values transformers dequantizes
    experts = model.model.layers[1].mlp.experts
    gate_up = experts.gate_up_proj.detach()[5].T.numpy()  # [2I, D]
    mine = ours.weights.layers[1].experts[5]
    np.testing.assert_array_equal(dequantize(mine.gate), gate_up[0::2])
    np.testing.assert_array_equal(dequantize(mine.up), gate_up[1::2])
    np.testing.assert_array_equal(dequantize(mine.down), experts.down_proj.detach()[5].T.numpy())


def test_streams_and_converts(published, tmp_path):
    from mer.store.convert import convert

    _, path = published
    resident = mer.load_model(path)
    want = resident.logits(IDS)
    with mer.load_model(path, cache_bytes=40_000) as streamed:
        np.testing.assert_array_equal(streamed.logits(IDS), want)
    convert(path, tmp_path / "store")
    np.testing.assert_array_equal(mer.load_model(tmp_path / "store").logits(IDS), want)


def test_other_quantization_is_refused(published, tmp_path):
    import shutil

    _, path = published
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    proc = run_mer("generate", "--model", str(tmp_path / "m"), "--prompt", "hi")
    assert_one_line_error(proc, "config.json", "bitsandbytes", "not supported")
