"""Tiny random Hugging Face models, built offline with transformers, for reference tests."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

# A variety of shapes and position schemes; every hidden/intermediate size is a multiple of 32
# so the same models can be quantized to GGUF blocks.
CONFIGS: dict[str, dict] = {
    "mixtral-base": dict(
        arch="mixtral",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "mixtral-mqa-window": dict(
        arch="mixtral",
        hidden_size=96,
        intermediate_size=128,
        num_attention_heads=6,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "mixtral-top3-linear": dict(
        arch="mixtral",
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=5,
        num_experts_per_tok=3,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
    ),
    "qwen3moe-base": dict(
        arch="qwen3moe",
        hidden_size=64,
        moe_intermediate_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # q is 128 wide, twice the hidden size, as in Qwen3-30B-A3B
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "qwen3moe-top4-softmax": dict(
        arch="qwen3moe",
        hidden_size=96,
        moe_intermediate_size=32,
        intermediate_size=96,
        num_attention_heads=6,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "olmoe-base": dict(
        arch="olmoe",
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "olmoe-gqa-top3-norm": dict(
        arch="olmoe",
        hidden_size=96,
        intermediate_size=32,
        num_attention_heads=6,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    ),
    # DeepSeek-V3: latent attention with compressed queries, sigmoid routing with a bias and
    # groups, a dense first layer, a shared expert, a routed scaling factor
    "deepseek3-base": dict(
        arch="deepseek3",
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,  # as released configs say (unused by MLA)
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=24,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # DeepSeek-V3 with YaRN (released with factor 40, mscale 1), rotate-half RoPE, direct
    # query projection, no groups, unnormalised weights, two shared experts, no dense layer
    "deepseek3-yarn": dict(
        arch="deepseek3",
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,  # as released configs say (unused by MLA)
        q_lora_rank=None,
        kv_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=6,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        n_shared_experts=2,
        first_k_dense_replace=0,
        routed_scaling_factor=1.5,
        norm_topk_prob=False,
        rope_interleave=False,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 16.0,  # 1024 positions from 64
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    # DeepSeek-V2-Lite's shape: softmax greedy top-k, two shared experts, a dense first layer
    "deepseek2-lite": dict(
        arch="deepseek2",
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,  # as released configs say (unused by MLA)
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=2,
        first_k_dense_replace=1,
        topk_method="greedy",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # DeepSeek-V2's group-limited routing (groups ranked by their best expert), compressed
    # queries, a routed scaling factor
    "deepseek2-group": dict(
        arch="deepseek2",
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,  # as released configs say (unused by MLA)
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=0,
        topk_method="group_limited_greedy",
        routed_scaling_factor=16.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # Qwen2-MoE: q/k/v biases, a gated shared expert beside softmax top-k experts
    "qwen2moe-base": dict(
        arch="qwen2moe",
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "qwen2moe-top4-norm": dict(
        arch="qwen2moe",
        hidden_size=96,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_attention_heads=6,
        num_key_value_heads=6,
        num_experts=12,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # gpt-oss: attention sinks, sliding and full layers alternating (window 8, so the long
    # prompts leave it), projection and expert biases, the router's logit bias, the SwiGLU
    # clamp as released
    "gptoss-base": dict(
        arch="gptoss",
        hidden_size=64,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),
    # gpt-oss's released YaRN (truncate false) at a tiny original context, full attention
    # first, MQA, top-3 of 6, a clamp low enough to bite on most activations
    "gptoss-yarn-clamp": dict(
        arch="gptoss",
        hidden_size=96,
        intermediate_size=32,
        num_attention_heads=6,
        num_key_value_heads=1,
        head_dim=32,
        num_local_experts=6,
        num_experts_per_tok=3,
        sliding_window=16,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        swiglu_limit=0.4,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 16.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 64,
            "rope_theta": 150000.0,
        },
    ),
    "llama-llama3rope": dict(
        arch="llama",
        hidden_size=64,
        intermediate_size=160,
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
    ),
    "llama-tied-headdim": dict(
        arch="llama",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def build_model(
    name: str, seed: int = 0, vocab_size: int = 512, n_layers: int = 2, init_std: float = 0.1
):
    """A random transformers model (float32) for CONFIGS[name]; weights drawn with std init_std."""
    import transformers

    spec = dict(CONFIGS[name])
    arch = spec.pop("arch")
    common = dict(
        vocab_size=vocab_size,
        num_hidden_layers=n_layers,
        max_position_embeddings=1024,
        initializer_range=init_std,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
        "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
        "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
        "deepseek2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
        "deepseek3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
        "gptoss": ("GptOssConfig", "GptOssForCausalLM"),
    }[arch]
    if "layer_types" in spec:  # one per layer: the spec's, repeated
        spec["layer_types"] = [
            spec["layer_types"][i % len(spec["layer_types"])] for i in range(n_layers)
        ]
    config = getattr(transformers, config_cls)(**common, **spec)
    model = getattr(transformers, model_cls)(config)
    # Norm weights start at 1.0; randomise them so a mix-up of norms cannot pass unnoticed.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif pname.endswith((".bias", "_bias")):  # projection biases start at zero too
                p.uniform_(-0.2, 0.2)
            elif pname.endswith(".sinks"):  # gpt-oss: comparable to the attention scores
                p.uniform_(-0.5, 1.5)
        # DeepSeek-V3's choice bias starts at zero; make it matter
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    return model.eval()


def save_model(
    model, directory: Path, dtype: str = "f32", max_shard_size: str | None = None
) -> Path:
    """save_pretrained in `dtype`; returns the directory.

    The model stays float32 but its parameters are rounded to `dtype`, so it computes on
    exactly the saved weights. (Casting the model itself would also round buffers such as
    RoPE's inverse frequencies, making the reference less exact than it should be.)
    """
    torch_dtype = TORCH_DTYPES[dtype]
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    copy.deepcopy(model).to(torch_dtype).save_pretrained(directory, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch_dtype).float())
    return directory


def expert_tensor_names(model) -> list[str]:
    """The FFN weight names of a transformers Llama or MoE model (routers excluded)."""
    return [
        n for n, _ in model.named_parameters() if ".mlp." in n and not n.endswith("mlp.gate.weight")
    ]


def dequantize_experts(model, kind: str) -> None:
    """Replace FFN weights in place by gguf's dequantize(quantize(w)) — the values a quantized
    mer model computes with, produced by llama.cpp's own Python package."""
    qtype = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[kind]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in expert_tensor_names(model):
            p = params[name]
            w = p.detach().float().numpy()
            flat = w.reshape(-1, w.shape[-1])
            deq = dequantize(quantize(flat, qtype), qtype).reshape(w.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(deq)))


def hf_logits(model, ids: list[int]) -> np.ndarray:
    """All-position float32 logits [n, V] from transformers."""
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n_new: int) -> list[int]:
    """n_new greedy tokens from transformers, ignoring end-of-sequence tokens."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
    return seq[len(ids) :]


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


def train_briefly(
    model, sequences: list[list[int]], steps: int = 150, lr: float = 3e-3, seed: int = 0
):
    """A few hundred AdamW steps of next-token training on `sequences`.

    A random model's next-token distributions are nearly flat, so any reference that rounds
    activations (llama.cpp quantizes them to 8 bits) flips near-tied top-1 choices at random;
    a briefly trained model has peaked predictions, like a real one.
    """
    torch.manual_seed(seed)
    width = max(len(s) for s in sequences)
    batch = torch.tensor([s + [s[-1]] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    labels = batch.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(batch, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
