"""Model hyperparameters, independent of the file format they came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mer.errors import ModelFormatError


@dataclass(frozen=True)
class RopeArgs:
    """Rotary position embedding: base frequency and optional frequency scaling."""

    theta: float = 10000.0
    scaling: str = "default"  # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # False: rotate halves (Hugging Face layout); True: rotate adjacent pairs (GGUF llama layout)
    interleaved: bool = False
    # per-frequency divisors stored by GGUF files (rope_freqs.weight) in place of `scaling`
    freq_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a Llama-family decoder; a dense FFN is one expert that is always selected."""

    arch: str  # "llama" | "mixtral" | "qwen3moe" | "olmoe"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    n_experts: int = 1
    n_experts_per_tok: int = 1
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    sliding_window: int | None = None
    rope: RopeArgs = field(default_factory=RopeArgs)
    # RMSNorm of queries and keys before RoPE: None, "head" (each head over its head_dim,
    # weights [hd]: Qwen3) or "full" (the whole projection, weights [H*hd] and [G*hd]: OLMoE)
    qk_norm: str | None = None
    # renormalise the top-k routing weights to sum to 1 (Mixtral's softmax over the top k is
    # the same thing); False keeps the softmax over all experts (OLMoE, some Qwen3-MoE)
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "max_seq_len",
        ):
            if getattr(self, name) <= 0:
                raise ModelFormatError(f"model config: {name} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(
                "model config: num_attention_heads must be a multiple of num_key_value_heads"
            )
        if self.qk_norm not in (None, "head", "full"):
            raise ModelFormatError(f"model config: qk_norm {self.qk_norm!r} is not known")
        if not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ModelFormatError(
                "model config: num_experts_per_tok must be between 1 and the number of experts"
            )

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1


def rope_from_hf(cfg: dict[str, Any]) -> RopeArgs:
    """RoPE settings from a config.json: transformers 5 `rope_parameters`, or older
    `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    params = {**legacy, **params}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise ModelFormatError(f"model config: rope scaling type {kind!r} is not supported")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelFormatError("model config: partial_rotary_factor is not supported")
    return RopeArgs(
        theta=float(theta),
        scaling=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def args_from_hf(cfg: dict[str, Any], arch: str, source: str) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json dict; `source` names the file in errors."""
    try:
        dim = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or dim // n_heads
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelFormatError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ModelFormatError(f"{source}: {flag}=true is not supported")
        return ModelArgs(
            arch=arch,
            vocab_size=int(cfg["vocab_size"]),
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            ffn_dim=int(cfg["intermediate_size"]),
            n_experts=int(cfg.get("num_local_experts", 1)),
            n_experts_per_tok=int(cfg.get("num_experts_per_tok", 1)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=cfg.get("sliding_window") or None,
            rope=rope_from_hf(cfg),
        )
    except KeyError as err:
        raise ModelFormatError(f"{source}: missing key {err.args[0]}") from None
    except (TypeError, ValueError) as err:
        raise ModelFormatError(f"{source}: bad value ({err})") from None
