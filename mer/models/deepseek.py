"""DeepSeek-V2 and -V3 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, R1 included).

Both use multi-head latent attention (MLA): keys and values are expanded per head from a
compressed latent (kv_lora_rank values per token, normalised) plus one rotary key shared by
all heads; the KV cache holds only those (`mer.models.transformer.KVCache`). The first
`first_k_dense_replace` layers have a dense FFN; the others route among `n_routed_experts`
and add `n_shared_experts` shared experts (one SwiGLU of their summed width) for every token.

Routing, as transformers computes it:
- V2: softmax scores; "greedy" top-k, or "group_limited_greedy" (groups ranked by their
  best score); weights times `routed_scaling_factor`, never renormalised (transformers'
  V2 ignores `norm_topk_prob`; the released V2 models all set it false).
- V3: sigmoid scores; the choice ranks scores + `e_score_correction_bias` within the
  `topk_group` best of `n_group` groups (ranked by their two best summed); weights are the
  scores, renormalised if `norm_topk_prob`, times `routed_scaling_factor`.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from mer.errors import ModelFormatError
from mer.io.safetensors import SafetensorsDir
from mer.models.args import ModelArgs, args_from_hf, naming, yarn_mscale
from mer.models.llama import Triple, swiglu_tensors
from mer.models.mixtral import ffn_tensors as routed_tensors

__all__ = ["V2", "V3", "ffn_tensors", "shared_tensors"]


def args_from_config(config: dict[str, Any], source: str, version: int) -> ModelArgs:
    def need(key: str) -> Any:
        if config.get(key) is None:
            raise ModelFormatError(f"{source}: missing key {key}")
        return config[key]

    if config.get("attention_bias"):
        raise ModelFormatError(f"{source}: attention_bias=true is not supported")
    n_experts = int(need("n_routed_experts"))
    moe_width = int(need("moe_intermediate_size"))
    rank, rope_dim = int(need("kv_lora_rank")), int(need("qk_rope_head_dim"))
    nope, v_dim = int(need("qk_nope_head_dim")), int(need("v_head_dim"))
    if rope_dim % 2:
        raise ModelFormatError(f"{source}: qk_rope_head_dim must be even")
    n_group = int(config.get("n_group") or 1)
    topk_group = int(config.get("topk_group") or 1)
    if version == 2:
        method = config.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ModelFormatError(f"{source}: topk_method {method!r} is not supported")
        if method == "greedy":
            n_group = topk_group = 1
        routing = dict(scoring="softmax", group_score="max", norm_topk_prob=False)
    else:
        method = config.get("topk_method") or "noaux_tc"
        scoring = config.get("scoring_func") or "sigmoid"
        if method != "noaux_tc" or scoring != "sigmoid":
            raise ModelFormatError(
                f"{source}: routing {method!r} with {scoring!r} scores is not supported "
                "(DeepSeek-V3 routes with noaux_tc over sigmoid scores)"
            )
        routing = dict(
            scoring="sigmoid",
            group_score="top2",
            router_bias=True,
            norm_topk_prob=bool(config.get("norm_topk_prob", True)),
        )
    cfg = {
        **config,
        "head_dim": rope_dim,  # RoPE turns the rotary part only
        "num_key_value_heads": 1,  # one cached latent row per position
        "num_local_experts": n_experts,
        "intermediate_size": moe_width,
        "sliding_window": None,
    }
    cfg.pop("attention_bias", None)
    args = args_from_hf(cfg, f"deepseek{version}", source)
    rope = args.rope
    if version == 2 or config.get("rope_interleave", True):
        rope = replace(rope, interleaved=True)
    scale = (nope + rope_dim) ** -0.5
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    if rope.scaling != "default" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(rope.factor, params["mscale_all_dim"]) ** 2
    first_dense = int(config.get("first_k_dense_replace") or 0)
    with naming(source):
        return replace(
            args,
            rope=rope,
            n_group=n_group,
            topk_group=topk_group,
            routed_scale=float(config.get("routed_scaling_factor") or 1.0),
            first_dense_layers=first_dense,
            dense_ffn_dim=int(need("intermediate_size")) if first_dense else 0,
            shared_ffn_dim=moe_width * int(config.get("n_shared_experts") or 0),
            q_lora_rank=int(config.get("q_lora_rank") or 0),
            kv_lora_rank=rank,
            qk_nope_head_dim=nope,
            v_head_dim=v_dim,
            softmax_scale=scale,
            **routing,
        )


def ffn_tensors(
    src: SafetensorsDir, args: ModelArgs, layer: int
) -> tuple[str | None, list[Triple]]:
    """The router's name and the routed experts; none for a dense layer."""
    if args.is_dense_layer(layer):
        return None, []
    return routed_tensors(src, args, layer)


def shared_tensors(src: SafetensorsDir, args: ModelArgs, layer: int) -> Triple | None:
    """The FFN every token of `layer` goes through: the dense FFN of a first layer, or the
    shared experts of an MoE layer."""
    if args.is_dense_layer(layer):
        p, width = f"model.layers.{layer}.mlp.", args.dense_ffn_dim
    elif args.shared_ffn_dim:
        p, width = f"model.layers.{layer}.mlp.shared_experts.", args.shared_ffn_dim
    else:
        return None
    return swiglu_tensors(src, p, width, args.dim)


# the hooks mer.models.hf looks up for each architecture
V2 = SimpleNamespace(
    args_from_config=lambda config, source: args_from_config(config, source, 2),
    ffn_tensors=ffn_tensors,
    shared_tensors=shared_tensors,
)
V3 = SimpleNamespace(
    args_from_config=lambda config, source: args_from_config(config, source, 3),
    ffn_tensors=ffn_tensors,
    shared_tensors=shared_tensors,
)
