"""gpt-oss (GptOssForCausalLM: gpt-oss-20b, gpt-oss-120b).

Beside the Llama-family decoder it has:
- attention sinks: a learnt logit per query head that joins every softmax without a value;
- sliding-window attention on some layers (`layer_types`: the even layers as released) and
  full attention on the others;
- biases on the query, key, value and output projections;
- a router with a bias on its logits, whose top-k logits are softmaxed (the softmax over all
  experts renormalised over the top k: the same weights);
- experts with biases and a clamped SwiGLU: out = (clamp(up) + 1) * g * sigmoid(1.702 g),
  g = min(gate, limit).

transformers keeps each layer's experts stacked and transposed: `mlp.experts.gate_up_proj`
[E, D, 2I] with gate and up in alternate columns, `down_proj` [E, I, D]; biases
`gate_up_proj_bias` [E, 2I] (alternating too) and `down_proj_bias` [E, D]. Each expert
matrix is read in that layout (`weights.arrange`), so an expert streams straight from the
safetensors file; a store holds them in the kernels' own layout.

OpenAI publishes the experts in MXFP4 instead: `gate_up_proj_blocks` [E, 2I, D/32, 16]
(gate and up in alternate rows) with their exponents `gate_up_proj_scales` [E, 2I, D/32],
and `down_proj_blocks` [E, D, I/32, 16] with `down_proj_scales`. Those become GGUF MXFP4
blocks on packing (`weights.openai_mxfp4`: the same values, another nibble order), no
rounding involved.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from mer.errors import ModelFormatError
from mer.io.raw import to_float32
from mer.io.safetensors import SafetensorsDir
from mer.kernels.swiglu import ALPHA
from mer.models.args import ModelArgs, args_from_hf, naming
from mer.models.weights import ExpertBiases

__all__ = ["args_from_config", "ffn_tensors", "layer_extras"]

_LAYER_TYPES = ("sliding_attention", "full_attention")


def args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    # the generic reader refuses projection biases: this model's are read below
    args = args_from_hf({**config, "attention_bias": False}, "gptoss", source)
    kinds = config.get("layer_types") or [
        _LAYER_TYPES[i % 2] for i in range(args.n_layers)
    ]  # transformers' default
    if not isinstance(kinds, list) or len(kinds) != args.n_layers:
        raise ModelFormatError(
            f"{source}: layer_types must name each of the {args.n_layers} layers"
        )
    unknown = [k for k in kinds if k not in _LAYER_TYPES]
    if unknown:
        raise ModelFormatError(f"{source}: layer type {unknown[0]!r} is not supported")
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method", "mxfp4") if isinstance(quant, dict) else quant
    if method != "mxfp4":
        raise ModelFormatError(f"{source}: quantization {method!r} is not supported (only mxfp4)")
    try:
        alpha = float(config.get("swiglu_alpha", ALPHA))
        limit = float(config.get("swiglu_limit", 7.0))
    except (TypeError, ValueError) as err:
        raise ModelFormatError(f"{source}: bad value ({err})") from None
    if alpha != ALPHA:
        raise ModelFormatError(f"{source}: swiglu_alpha {alpha} is not supported (only {ALPHA})")
    window = args.sliding_window if "sliding_attention" in kinds else None
    bias = bool(config.get("attention_bias", True))
    with naming(source):
        return replace(
            args,
            sliding_window=window,
            full_attention_layers=tuple(i for i, k in enumerate(kinds) if k == "full_attention")
            if window
            else (),
            qkv_bias=bias,
            o_bias=bias,
            sinks=True,
            router_logit_bias=True,
            expert_bias=True,
            swiglu_limit=limit,
            norm_topk_prob=True,
        )


def ffn_tensors(src: SafetensorsDir, args: ModelArgs, layer: int):
    """The router's tensor name and, per expert, its gate, up and down matrices as
    (stored array, kind, layout) for `weights.arrange`."""
    p = f"model.layers.{layer}.mlp."
    d, i, n = args.dim, args.ffn_dim, args.n_experts
    if src.has(p + "experts.gate_up_proj_blocks"):  # as OpenAI publishes gpt-oss
        if d % 32 or i % 32:
            raise ModelFormatError(f"{src.root}: MXFP4 experts need widths divisible by 32")
        e = p + "experts."
        gate_up = src.get_bytes(e + "gate_up_proj_blocks", (n, 2 * i, d // 32, 16))
        gate_up_e = src.get_bytes(e + "gate_up_proj_scales", (n, 2 * i, d // 32))
        down = src.get_bytes(e + "down_proj_blocks", (n, d, i // 32, 16))
        down_e = src.get_bytes(e + "down_proj_scales", (n, d, i // 32))
        triples = [
            (
                (gate_up[x], "mxfp4", "even_rows", gate_up_e[x]),
                (gate_up[x], "mxfp4", "odd_rows", gate_up_e[x]),
                (down[x], "mxfp4", "rows", down_e[x]),
            )
            for x in range(n)
        ]
        return p + "router.weight", triples
    gate_up, gu_kind = src.get(p + "experts.gate_up_proj", (n, d, 2 * i))
    down, down_kind = src.get(p + "experts.down_proj", (n, i, d))
    triples = [
        (
            (gate_up[e], gu_kind, "even_cols"),
            (gate_up[e], gu_kind, "odd_cols"),
            (down[e], down_kind, "cols"),
        )
        for e in range(n)
    ]
    return p + "router.weight", triples


def layer_extras(loader, layer: int) -> dict[str, Any]:
    """The LayerWeights fields gpt-oss adds: output bias, sinks, router and expert biases."""
    a = loader.args
    p = f"model.layers.{layer}."
    gate_up, kind = loader.src.get(
        p + "mlp.experts.gate_up_proj_bias", (a.n_experts, 2 * a.ffn_dim)
    )
    gate_up = to_float32(gate_up, kind)
    down, kind = loader.src.get(p + "mlp.experts.down_proj_bias", (a.n_experts, a.dim))
    return dict(
        bo=loader.vector(p + "self_attn.o_proj.bias") if a.o_bias else None,
        sinks=loader.vector(p + "self_attn.sinks", a.n_heads),
        router_logit_bias=loader.vector(p + "mlp.router.bias", a.n_experts),
        expert_biases=ExpertBiases(
            np.ascontiguousarray(gate_up[:, 0::2]),
            np.ascontiguousarray(gate_up[:, 1::2]),
            np.ascontiguousarray(to_float32(down, kind)),
            a.swiglu_limit,
        ),
    )
