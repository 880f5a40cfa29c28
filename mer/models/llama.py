"""Llama (LlamaForCausalLM): a dense SwiGLU FFN, run as one always-selected expert."""

from __future__ import annotations

from typing import Any

import numpy as np

from mer.io.safetensors import SafetensorsDir
from mer.models.args import ModelArgs, args_from_hf

Triple = tuple[tuple[np.ndarray, str], tuple[np.ndarray, str], tuple[np.ndarray, str]]


def args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    cfg = {**config, "num_local_experts": 1, "num_experts_per_tok": 1}
    return args_from_hf(cfg, "llama", source)


def ffn_tensors(
    src: SafetensorsDir, args: ModelArgs, layer: int
) -> tuple[str | None, list[Triple]]:
    """No router; one (gate, up, down) triple of raw tensors and their kinds."""
    p = f"model.layers.{layer}.mlp."
    d, i = args.dim, args.ffn_dim
    triple = (
        src.get(p + "gate_proj.weight", (i, d)),
        src.get(p + "up_proj.weight", (i, d)),
        src.get(p + "down_proj.weight", (d, i)),
    )
    return None, [triple]
