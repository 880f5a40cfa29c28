"""Broken model directories: `mer generate` exits non-zero with one line naming the culprit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.hf_models import build_model, save_model


def run_generate(model_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mer.cli", "generate", "--model", str(model_dir), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("good")
    save_model(build_model("mixtral-base"), directory, "f32", max_shard_size="60KB")
    return directory


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def with_config(src: Path, dst: Path, change: dict) -> Path:
    """A copy of model directory `src` whose config.json has `change` (None: key removed)."""
    d = copy_dir(src, dst)
    cfg = {**json.loads((d / "config.json").read_text()), **change}
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return d


def without_tensor(src: Path, dst: Path, name: str) -> Path:
    """A copy of single-shard model directory `src` without tensor `name`."""
    from safetensors.numpy import load_file, save_file

    d = copy_dir(src, dst)
    [shard] = d.glob("*.safetensors")
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard)
    return d


def test_missing_shard(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m")
    shard = sorted(d.glob("*.safetensors"))[1]
    shard.unlink()
    assert_one_line_error(run_generate(d), shard.name, "missing")


def test_truncated_safetensors(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m")
    shard = sorted(d.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    assert_one_line_error(run_generate(d), shard.name)


def test_unknown_architecture(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_generate(d), "config.json", "FancyNewForCausalLM")


def test_wrong_tensor_shape(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the expert tensors on disk are 96 wide
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(
        run_generate(d), "model.layers.0.block_sparse_moe.experts.0.w1.weight", "shape"
    )


def test_missing_tensor(good_dir, tmp_path):
    d = copy_dir(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_generate(d), "model.layers.2.", "missing")


def test_not_a_model(tmp_path):
    assert_one_line_error(run_generate(tmp_path / "nowhere"), "nowhere")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("qwen3")
    save_model(build_model("qwen3moe-base"), directory, "f32")
    return directory


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"mlp_only_layers": [0]}, ("mlp_only_layers", "not supported")),
        ({"decoder_sparse_step": 2}, ("decoder_sparse_step", "not supported")),
        ({"num_experts": None, "num_local_experts": None}, ("num_experts",)),
        ({"hidden_act": "gelu"}, ("hidden_act", "gelu")),
        ({"use_sliding_window": True, "max_window_layers": 1, "layer_types": [
            "full_attention", "sliding_attention"]}, ("sliding-window",)),
    ],
)  # fmt: skip
def test_unsupported_qwen3_settings(qwen3_dir, tmp_path, change, needles):
    d = with_config(qwen3_dir, tmp_path / "m", change)
    assert_one_line_error(run_generate(d), "config.json", *needles)


def test_missing_qk_norm_is_named(qwen3_dir, tmp_path):
    name = "model.layers.1.self_attn.k_norm.weight"
    d = without_tensor(qwen3_dir, tmp_path / "m", name)
    assert_one_line_error(run_generate(d), name, "missing")


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("deepseek3")
    save_model(build_model("deepseek3-base"), directory, "f32")
    return directory


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"scoring_func": "softmax"}, ("routing", "softmax", "not supported")),
        ({"topk_method": "group_limited_greedy"}, ("routing", "group_limited_greedy")),
        ({"architectures": ["DeepseekV2ForCausalLM"], "topk_method": "random"},
         ("topk_method", "random")),
        ({"kv_lora_rank": None}, ("missing key kv_lora_rank",)),
        ({"n_group": 3}, ("n_group",)),
        ({"topk_group": 5}, ("topk_group",)),
        ({"first_k_dense_replace": 9}, ("first_k_dense_replace",)),
        ({"qk_rope_head_dim": 15}, ("qk_rope_head_dim", "even")),
        ({"attention_bias": True}, ("attention_bias",)),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, ("longrope",)),
    ],
)  # fmt: skip
def test_unsupported_deepseek_settings(deepseek_dir, tmp_path, change, needles):
    """An unknown routing function or method, a bad group split, a missing key: one line."""
    d = with_config(deepseek_dir, tmp_path / "m", change)
    assert_one_line_error(run_generate(d), "config.json", *needles)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.self_attn.kv_b_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    ],
)
def test_missing_deepseek_tensor_is_named(deepseek_dir, tmp_path, name):
    d = without_tensor(deepseek_dir, tmp_path / "m", name)
    assert_one_line_error(run_generate(d), name, "missing")


@pytest.fixture(scope="module")
def gptoss_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("gptoss")
    save_model(build_model("gptoss-base"), directory, "f32")
    return directory


@pytest.mark.parametrize(
    "change,needles",
    [
        ({"layer_types": ["sliding_attention", "chunked_attention"]},
         ("layer type", "chunked_attention")),
        ({"layer_types": ["full_attention"]}, ("layer_types", "2 layers")),
        ({"swiglu_alpha": 1.5}, ("swiglu_alpha", "not supported")),
        ({"swiglu_limit": -1.0}, ("swiglu_limit",)),
        ({"swiglu_limit": "high"}, ("bad value",)),
        ({"quantization_config": {"quant_method": "gptq"}}, ("quantization", "gptq")),
    ],
)  # fmt: skip
def test_unsupported_gptoss_settings(gptoss_dir, tmp_path, change, needles):
    d = with_config(gptoss_dir, tmp_path / "m", change)
    assert_one_line_error(run_generate(d), "config.json", *needles)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.1.self_attn.sinks",
        "model.layers.0.mlp.router.bias",
        "model.layers.1.mlp.experts.gate_up_proj_bias",
        "model.layers.0.self_attn.o_proj.bias",
    ],
)
def test_missing_gptoss_tensor_is_named(gptoss_dir, tmp_path, name):
    d = without_tensor(gptoss_dir, tmp_path / "m", name)
    assert_one_line_error(run_generate(d), name, "missing")
