"""Model hyperparameters, independent of the file format they came from."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mer.errors import ModelFormatError


@dataclass(frozen=True)
class RopeArgs:
    """Rotary position embedding: base frequency and optional frequency scaling."""

    theta: float = 10000.0
    scaling: str = "default"  # "default" | "linear" | "llama3" | "yarn"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # False: rotate halves (Hugging Face layout); True: rotate adjacent pairs (GGUF llama layout)
    interleaved: bool = False
    # per-frequency divisors stored by GGUF files (rope_freqs.weight) in place of `scaling`
    freq_factors: tuple[float, ...] | None = None
    # YaRN: the band of frequencies blended between interpolation and extrapolation, and the
    # factor cos and sin are multiplied by (resolved from mscale/mscale_all_dim on loading)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0


@dataclass(frozen=True)
class ModelArgs:
    """The shape of a Llama-family decoder; a dense FFN is one expert that is always selected."""

    # "llama" | "mixtral" | "qwen2moe" | "qwen3moe" | "olmoe" | "deepseek2" | "deepseek3" |
    # "gptoss"
    arch: str
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
    # Routing beyond a softmax over all experts (DeepSeek): "sigmoid" scores each expert on
    # its own (DeepSeek-V3, with a per-expert bias added for the choice only: router_bias);
    # experts come in n_group groups of which the topk_group best (by their best score, or
    # the sum of their two best: group_score "max" | "top2") are eligible; the kept weights
    # are multiplied by routed_scale.
    scoring: str = "softmax"
    router_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    routed_scale: float = 1.0
    # FFN beside the routed experts: the first `first_dense_layers` layers have one dense
    # SwiGLU FFN of width dense_ffn_dim instead of experts; every MoE layer adds a shared
    # expert of width shared_ffn_dim (0: none) that every token goes through.
    first_dense_layers: int = 0
    dense_ffn_dim: int = 0
    shared_ffn_dim: int = 0
    # the shared expert's output is scaled per token by sigmoid(h . w) (Qwen2-MoE)
    shared_gate: bool = False
    # biases on the query, key and value projections (Qwen2-MoE)
    qkv_bias: bool = False
    # DeepSeek's multi-head latent attention when kv_lora_rank > 0: keys and values come from
    # a compressed latent of kv_lora_rank values per token (what the KV cache holds) plus one
    # shared rotary key of head_dim values; query heads are qk_nope_head_dim + head_dim wide,
    # value heads v_head_dim; q_lora_rank > 0 compresses the queries too.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # attention's softmax scale; 0: 1/sqrt(query head width)
    softmax_scale: float = 0.0
    # layers that attend over the whole context although sliding_window is set (gpt-oss
    # alternates sliding and full layers)
    full_attention_layers: tuple[int, ...] = ()
    # gpt-oss: a learnt logit per query head that joins each softmax without a value
    # ("attention sinks"); a bias on the output projection; a bias on the router's logits
    # (choice and weights alike); biases on each expert's gate, up and down projections
    sinks: bool = False
    o_bias: bool = False
    router_logit_bias: bool = False
    expert_bias: bool = False
    # gpt-oss's clamped SwiGLU when > 0: gate clamped to <= limit, up to [-limit, limit],
    # out = (up + 1) * gate * sigmoid(1.702 * gate); 0: silu(gate) * up
    swiglu_limit: float = 0.0

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
        if self.scoring not in ("softmax", "sigmoid"):
            raise ModelFormatError(f"model config: scoring function {self.scoring!r} is not known")
        if self.group_score not in ("max", "top2"):
            raise ModelFormatError(f"model config: group score {self.group_score!r} is not known")
        if self.n_group < 1 or self.n_experts % self.n_group:
            raise ModelFormatError("model config: n_group must divide the number of experts")
        if not 1 <= self.topk_group <= self.n_group:
            raise ModelFormatError("model config: topk_group must be between 1 and n_group")
        if self.n_experts_per_tok > self.topk_group * (self.n_experts // self.n_group):
            raise ModelFormatError(
                "model config: num_experts_per_tok exceeds the experts of topk_group groups"
            )
        if not 0 <= self.first_dense_layers <= self.n_layers:
            raise ModelFormatError("model config: first_k_dense_replace exceeds the layers")
        if self.first_dense_layers and self.dense_ffn_dim <= 0:
            raise ModelFormatError("model config: dense layers need intermediate_size")
        if self.kv_lora_rank < 0 or self.q_lora_rank < 0:
            raise ModelFormatError("model config: kv_lora_rank and q_lora_rank must be >= 0")
        if self.kv_lora_rank and (self.qk_nope_head_dim <= 0 or self.v_head_dim <= 0):
            raise ModelFormatError("model config: qk_nope_head_dim and v_head_dim must be positive")
        if self.swiglu_limit < 0:
            raise ModelFormatError("model config: swiglu_limit must be >= 0")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelFormatError("model config: sliding_window must be positive")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek)."""
        return self.kv_lora_rank > 0

    @property
    def q_head_dim(self) -> int:
        """Width of a query (and key) head: the rotary part plus, with MLA, the rest."""
        return self.qk_nope_head_dim + self.head_dim if self.mla else self.head_dim

    @property
    def value_dim(self) -> int:
        """Width of the attention output fed to the output projection (all heads)."""
        return self.n_heads * (self.v_head_dim if self.mla else self.head_dim)

    @property
    def attention_scale(self) -> float:
        return self.softmax_scale or self.q_head_dim**-0.5

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention, None for the whole context."""
        return None if layer in self.full_attention_layers else self.sliding_window

    def is_dense_layer(self, layer: int) -> bool:
        """A layer whose FFN is one dense SwiGLU, in a model whose others are MoE."""
        return layer < self.first_dense_layers


def rope_from_hf(cfg: dict[str, Any]) -> RopeArgs:
    """RoPE settings from a config.json: transformers 5 `rope_parameters`, or older
    `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    params = {**legacy, **params}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise ModelFormatError(f"model config: rope scaling type {kind!r} is not supported")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelFormatError("model config: partial_rotary_factor is not supported")
    factor = float(params.get("factor") or 1.0)
    original = params.get("original_max_position_embeddings")
    if kind == "yarn" and not original:
        original = cfg.get("max_position_embeddings")
    if kind == "yarn" and not params.get("factor"):
        factor = float(cfg["max_position_embeddings"]) / float(original)
    return RopeArgs(
        theta=float(theta),
        scaling=kind,
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original or 8192),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
        attention_factor=yarn_attention_factor(params, factor) if kind == "yarn" else 1.0,
    )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(params: dict[str, Any], factor: float) -> float:
    """YaRN's cos/sin multiplier: given, or from mscale and mscale_all_dim as transformers
    derives it."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
    return yarn_mscale(factor)


@contextmanager
def naming(source: str) -> Iterator[None]:
    """Errors about the model config inside name `source` (the config file) instead."""
    try:
        yield
    except ModelFormatError as err:
        text = str(err)
        if text.startswith("model config:"):
            raise ModelFormatError(source + text[len("model config") :]) from None
        raise


def args_from_hf(cfg: dict[str, Any], arch: str, source: str) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json dict; `source` names the file in errors."""
    with naming(source):
        return _args_from_hf(cfg, arch, source)


def _args_from_hf(cfg: dict[str, Any], arch: str, source: str) -> ModelArgs:
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
