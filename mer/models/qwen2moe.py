"""Qwen2-MoE (Qwen2MoeForCausalLM: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): softmax top-k routed
experts, not renormalised unless `norm_topk_prob`, plus one shared expert whose output is
scaled per token by sigmoid(h . shared_expert_gate); biases on the query, key and value
projections (`qkv_bias`). Dense layers among the MoE layers and sliding windows on some layers
only are refused, as for Qwen3-MoE."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mer.errors import ModelFormatError
from mer.io.safetensors import SafetensorsDir
from mer.models import qwen3moe
from mer.models.args import ModelArgs, naming
from mer.models.llama import Triple, swiglu_tensors
from mer.models.mixtral import ffn_tensors

__all__ = ["args_from_config", "ffn_tensors", "shared_tensors"]


def args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    args = qwen3moe.args_from_config(config, source)
    width = int(config.get("shared_expert_intermediate_size") or 0)
    if width <= 0:
        raise ModelFormatError(f"{source}: missing key shared_expert_intermediate_size")
    with naming(source):
        return replace(
            args,
            arch="qwen2moe",
            qk_norm=None,
            shared_ffn_dim=width,
            shared_gate=True,
            qkv_bias=bool(config.get("qkv_bias", True)),
        )


def shared_tensors(src: SafetensorsDir, args: ModelArgs, layer: int) -> Triple:
    p = f"model.layers.{layer}.mlp.shared_expert."
    return swiglu_tensors(src, p, args.shared_ffn_dim, args.dim)
