"""Mixtral (MixtralForCausalLM): a top-k routed mixture of SwiGLU experts.

Checkpoints name experts three ways: per expert (`block_sparse_moe.experts.E.w1/w3/w2` =
gate/up/down, as Mixtral is published and as transformers saves it; `mlp.experts.E.
gate_proj/up_proj/down_proj` with the router at `mlp.gate`, as Qwen-MoE and OLMoE are) or
stacked (`mlp.experts.gate_up_proj` [E, 2I, D] and `down_proj` [E, D, I], transformers 5's
in-memory layout). `ffn_tensors` takes any of them, for every softmax-top-k MoE here.
"""

from __future__ import annotations

from typing import Any

from mer.io.safetensors import SafetensorsDir
from mer.models.args import ModelArgs, args_from_hf
from mer.models.llama import Triple, swiglu_tensors


def args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    return args_from_hf(config, "mixtral", source)


def ffn_tensors(
    src: SafetensorsDir, args: ModelArgs, layer: int
) -> tuple[str | None, list[Triple]]:
    """The router's tensor name and one (gate, up, down) triple per expert."""
    d, i, n = args.dim, args.ffn_dim, args.n_experts
    stacked = f"model.layers.{layer}.mlp."
    if src.has(stacked + "experts.gate_up_proj"):
        gate_up, gu_kind = src.get(stacked + "experts.gate_up_proj", (n, 2 * i, d))
        down, down_kind = src.get(stacked + "experts.down_proj", (n, d, i))
        triples = [
            ((gate_up[e, :i], gu_kind), (gate_up[e, i:], gu_kind), (down[e], down_kind))
            for e in range(n)
        ]
        return stacked + "gate.weight", triples
    if src.has(stacked + "experts.0.gate_proj.weight"):  # Qwen-MoE and OLMoE as published
        triples = [swiglu_tensors(src, f"{stacked}experts.{e}.", i, d) for e in range(n)]
        return stacked + "gate.weight", triples
    p = f"model.layers.{layer}.block_sparse_moe."
    triples = [
        (
            src.get(f"{p}experts.{e}.w1.weight", (i, d)),
            src.get(f"{p}experts.{e}.w3.weight", (i, d)),
            src.get(f"{p}experts.{e}.w2.weight", (d, i)),
        )
        for e in range(n)
    ]
    return p + "gate.weight", triples
