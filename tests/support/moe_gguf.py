"""Tiny Qwen3-MoE, OLMoE, DeepSeek-V3 and gpt-oss models, trained briefly, converted and quantized by llama.cpp's own
tools (tests/conftest.py builds each once per session).

llama.cpp's converter accepts only tokenizers it recognises, so these models use the bundled
SmolLM2 tokenizer (49152 tokens), rebuilt from its GGUF vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from tests.support import llamacpp
from tests.support.hf_models import CONFIGS, build_model, save_model, train_briefly
from tests.support.mixtral_gguf import TEXTS
from tests.support.tokenizers import write_smollm2_tokenizer

# K-quants need rows that are multiples of 256.
CONFIGS["qwen3moe-gguf"] = dict(
    arch="qwen3moe",
    hidden_size=256,
    moe_intermediate_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,  # llama.cpp renormalises qwen3moe's routing weights, as Qwen3 does
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
CONFIGS["olmoe-gguf"] = dict(
    arch="olmoe",
    hidden_size=256,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=False,  # nor does llama.cpp for olmoe
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# DeepSeek-V3's shape (llama.cpp's deepseek2): latent attention with compressed queries, a
# dense first layer, sigmoid routing with a bias in groups, a shared expert
CONFIGS["deepseek2-gguf"] = dict(
    CONFIGS["deepseek3-base"],  # its routing and FFN layout, at sizes K-quants take
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    q_lora_rank=256,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
)
# gpt-oss as released: sliding (here 16 positions) and full layers alternating, sinks, biases,
# YaRN over a 4096-position original context
CONFIGS["gptoss-gguf"] = dict(
    arch="gptoss",
    hidden_size=256,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=16,
    rope_parameters={
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
        "rope_theta": 150000.0,
    },
)
# what released configs say and transformers does not write back (llama.cpp's converter
# reads the gating function from it)
SAVED_EXTRA = {"deepseek2": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}}
KINDS = ["f16", "q8_0", "q4_k_m"]
EXTRA_KINDS = {"gptoss": ["mxfp4"]}  # the experts' own block type


def build(arch: str, root: Path, cache_dir: Path) -> tuple[object, dict[str, Path]]:
    """(transformers model holding the F16-rounded weights, {kind: gguf path})."""
    hf_dir = root / "hf"
    vocab = write_smollm2_tokenizer(hf_dir)
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    hf = build_model(f"{arch}-gguf", vocab_size=vocab, init_std=0.03)
    # fewer, larger steps than the Mixtral files take: the 49152-token head makes each step
    # dear (40 steps peak the predictions enough: top-1 0.99 against llama.cpp's Q8_0)
    train_briefly(hf, [tok.encode(t).ids for t in TEXTS], steps=40, lr=5e-3)
    save_model(hf, hf_dir, "f16")
    if arch in SAVED_EXTRA:
        config = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({**config, **SAVED_EXTRA[arch]}))
    return hf, llamacpp.gguf_files(hf_dir, root, cache_dir, KINDS + EXTRA_KINDS.get(arch, []))
