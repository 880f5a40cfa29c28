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


def swiglu_tensors(src: SafetensorsDir, prefix: str, width: int, dim: int) -> Triple:
    """The (gate, up, down) raw tensors and kinds of the SwiGLU FFN at `prefix`
    (`gate_proj`, `up_proj`, `down_proj`), `width` wide."""
    return (
        src.get(prefix + "gate_proj.weight", (width, dim)),
        src.get(prefix + "up_proj.weight", (width, dim)),
        src.get(prefix + "down_proj.weight", (dim, width)),
    )


def ffn_tensors(
    src: SafetensorsDir, args: ModelArgs, layer: int
) -> tuple[str | None, list[Triple]]:
    """No router; one (gate, up, down) triple of raw tensors and their kinds."""
    return None, [swiglu_tensors(src, f"model.layers.{layer}.mlp.", args.ffn_dim, args.dim)]
