"""Qwen3-MoE (Qwen3MoeForCausalLM): Mixtral's shape with RMSNorm on each query and key head
before RoPE, 128 small experts, top-8, and `norm_topk_prob` saying whether the top-k routing
weights are renormalised. Experts are named as Qwen publishes them (`mlp.experts.E.gate_proj`)
or stacked; the router is `mlp.gate`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mer.errors import ModelFormatError
from mer.models.args import ModelArgs, args_from_hf
from mer.models.mixtral import ffn_tensors

__all__ = ["args_from_config", "ffn_tensors"]


def sliding_window(config: dict[str, Any], source: str) -> int | None:
    """The window if every layer uses one, None if none does; mixed layers are refused."""
    if not config.get("use_sliding_window", False):
        return None
    kinds = set(config.get("layer_types") or ["sliding_attention"])
    if kinds != {"sliding_attention"}:
        raise ModelFormatError(
            f"{source}: sliding-window attention on some layers only (max_window_layers) "
            "is not supported"
        )
    return config.get("sliding_window") or None


def args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    step = config.get("decoder_sparse_step", 1)
    if config.get("mlp_only_layers") or step not in (1, None):
        raise ModelFormatError(
            f"{source}: dense layers among the MoE layers (mlp_only_layers, "
            "decoder_sparse_step) are not supported"
        )
    # published configs say num_experts; transformers 5 saves num_local_experts
    n_experts = config.get("num_experts") or config.get("num_local_experts")
    if not n_experts:
        raise ModelFormatError(f"{source}: missing key num_experts")
    if "moe_intermediate_size" not in config:
        raise ModelFormatError(f"{source}: missing key moe_intermediate_size")
    cfg = {
        **config,
        "num_local_experts": n_experts,
        "intermediate_size": config["moe_intermediate_size"],
        "sliding_window": sliding_window(config, source),
    }
    args = args_from_hf(cfg, "qwen3moe", source)
    return replace(args, qk_norm="head", norm_topk_prob=bool(config.get("norm_topk_prob", False)))
