"""OLMoE (OlmoeForCausalLM): 64 experts, top-8, RMSNorm over the whole query and key
projections before RoPE, and routing weights that are the softmax over all experts unless
`norm_topk_prob`. `clip_qkv` is refused (no released OLMoE sets it)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mer.errors import ModelFormatError
from mer.models.args import ModelArgs, args_from_hf
from mer.models.mixtral import ffn_tensors

__all__ = ["args_from_config", "ffn_tensors"]


def args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    if config.get("clip_qkv") is not None:
        raise ModelFormatError(f"{source}: clip_qkv is not supported")
    n_experts = config.get("num_experts") or config.get("num_local_experts")
    if not n_experts:
        raise ModelFormatError(f"{source}: missing key num_experts")
    cfg = {**config, "num_local_experts": n_experts, "sliding_window": None}
    args = args_from_hf(cfg, "olmoe", source)
    if args.head_dim * args.n_heads != args.dim:
        raise ModelFormatError(f"{source}: head_dim must be hidden_size / num_attention_heads")
    return replace(args, qk_norm="full", norm_topk_prob=bool(config.get("norm_topk_prob", False)))
