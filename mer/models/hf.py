"""Load a Hugging Face model directory (config.json + safetensors) into kernel-ready weights.

The parts every Llama-family checkpoint shares (embeddings, attention, norms, lm_head) are
read here; each architecture's module names its FFN tensors (`ffn_tensors`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np

from mer.errors import ModelFormatError
from mer.io.raw import to_float32
from mer.io.safetensors import SafetensorsDir
from mer.kernels.matmul import PackedWeight, from_gguf_blocks, pack_float, quantize, requantize
from mer.models import deepseek, gptoss, llama, mixtral, olmoe, qwen2moe, qwen3moe
from mer.models.args import ModelArgs
from mer.models.weights import (
    Embedding,
    ExpertWeights,
    LayerWeights,
    MatrixSpec,
    MLAWeights,
    ModelWeights,
    arrange,
    matrix_shape,
    mxfp4_rows,
    openai_mxfp4,
)

# each names its config (args_from_config), its routed FFN (ffn_tensors) and optionally an
# FFN every token goes through (shared_tensors)
ARCHITECTURES: dict[str, ModuleType | SimpleNamespace] = {
    "LlamaForCausalLM": llama,
    "MixtralForCausalLM": mixtral,
    "Qwen2MoeForCausalLM": qwen2moe,
    "Qwen3MoeForCausalLM": qwen3moe,
    "OlmoeForCausalLM": olmoe,
    "DeepseekV2ForCausalLM": deepseek.V2,
    "DeepseekV3ForCausalLM": deepseek.V3,
    "GptOssForCausalLM": gptoss,
}
QUANT_KINDS = ("q8_0", "q4_0")


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise ModelFormatError(f"{file}: missing (not a Hugging Face model directory)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{file}: invalid JSON ({err})") from None


def load_hf_dir(
    path: Path, quant: str | None = None, stream: bool = False
) -> tuple[ModelArgs, ModelWeights]:
    """ModelArgs and weights of the model in directory `path`; experts quantized if `quant`.

    With `stream`, experts are not loaded: each layer lists where its experts lie (ExpertSpec).
    """
    if quant is not None and quant not in QUANT_KINDS:
        raise ModelFormatError(f"--quant {quant!r}: choose one of {', '.join(QUANT_KINDS)}")
    config = read_config(path)
    names = config.get("architectures") or [config.get("model_type", "?")]
    module = ARCHITECTURES.get(names[0])
    if module is None:
        raise ModelFormatError(
            f"{path / 'config.json'}: architecture {names[0]} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    args = module.args_from_config(config, str(path / "config.json"))
    src = SafetensorsDir(path)
    loader = _Loader(src, args, quant, stream)
    return args, loader.model(module)


class _Loader:
    def __init__(
        self, src: SafetensorsDir, args: ModelArgs, quant: str | None, stream: bool
    ) -> None:
        self.src, self.args, self.quant, self.stream = src, args, quant, stream

    def vector(self, name: str, length: int | None = None) -> np.ndarray:
        arr, kind = self.src.get(name, (length or self.args.dim,))
        return np.ascontiguousarray(to_float32(arr, kind))

    def qk_norms(self, prefix: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        a = self.args
        if a.qk_norm is None:
            return None, None
        q_len, k_len = (
            (a.head_dim, a.head_dim)
            if a.qk_norm == "head"
            else (a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim)
        )
        return (
            self.vector(prefix + "self_attn.q_norm.weight", q_len),
            self.vector(prefix + "self_attn.k_norm.weight", k_len),
        )

    def matrix(self, name: str, shape: tuple[int, int]) -> PackedWeight:
        arr, kind = self.src.get(name, shape)
        return pack_float(arr, kind)

    def expert_matrix(
        self, arr: np.ndarray, kind: str, layout: str = "rows", exponents: np.ndarray | None = None
    ) -> PackedWeight | MatrixSpec:
        """Expert matrix held by stored array `arr` in `layout` (weights.LAYOUTS), or with
        `exponents` by OpenAI's MXFP4 blocks `arr` [rows, nb, 16] (weights.MXFP4_LAYOUTS)."""
        if exponents is not None:
            return self.mxfp4_matrix(arr, layout, exponents)
        if self.stream:
            if not arr.flags.c_contiguous:
                raise ModelFormatError(f"{self.src.root}: an expert matrix is not contiguous")
            file, offset = self.src.locate(arr)
            rows, cols = matrix_shape(layout, arr.shape)
            return MatrixSpec(
                file, offset, arr.nbytes, kind, rows, cols, quant=self.quant, layout=layout
            )
        return self.resident_matrix(arrange(arr, layout), kind)

    def mxfp4_matrix(self, blocks: np.ndarray, layout: str, exponents: np.ndarray):
        rows = blocks.shape[0] // (1 if layout == "rows" else 2)
        cols = blocks.shape[1] * 32
        if self.stream:
            file, offset = self.src.locate(blocks)
            return MatrixSpec(
                file,
                offset,
                blocks.nbytes,
                "mxfp4",
                rows,
                cols,
                quant=self.quant,
                layout=layout,
                exponents=exponents,
            )
        raw = openai_mxfp4(mxfp4_rows(blocks, layout), mxfp4_rows(exponents, layout))
        return requantize(from_gguf_blocks(raw.reshape(-1), "mxfp4", rows, cols), self.quant)

    def resident_matrix(self, arr: np.ndarray, kind: str) -> PackedWeight:
        if self.quant is None:
            return pack_float(np.ascontiguousarray(arr), kind)
        return quantize(np.ascontiguousarray(to_float32(arr, kind)), self.quant)

    def expert(self, triple) -> ExpertWeights | tuple[MatrixSpec, ...]:
        """Each part is (stored array, kind[, layout[, MXFP4 exponents]]) (expert_matrix)."""
        parts = tuple(self.expert_matrix(*part) for part in triple)
        return parts if self.stream else ExpertWeights(*parts)

    def model(self, module) -> ModelWeights:
        a = self.args
        embed_raw, embed_kind = self.src.get("model.embed_tokens.weight", (a.vocab_size, a.dim))
        if a.tie_embeddings and not self.src.has("lm_head.weight"):
            lm_head = pack_float(embed_raw, embed_kind)
        else:
            lm_head = self.matrix("lm_head.weight", (a.vocab_size, a.dim))
        layers = [self.layer(module, i) for i in range(a.n_layers)]
        return ModelWeights(
            embed=Embedding(embed_raw, embed_kind, a.vocab_size, a.dim),
            layers=layers,
            norm=self.vector("model.norm.weight"),
            lm_head=lm_head,
        )

    def layer(self, module, i: int) -> LayerWeights:
        a = self.args
        p = f"model.layers.{i}."
        router_name, experts = module.ffn_tensors(self.src, a, i)
        router = bias = None
        if router_name is not None:
            arr, kind = self.src.get(router_name, (a.n_experts, a.dim))
            router = np.ascontiguousarray(to_float32(arr, kind))
            if a.router_bias:
                bias = self.vector(
                    router_name.replace(".weight", ".e_score_correction_bias"), a.n_experts
                )
        shared = getattr(module, "shared_tensors", lambda *_: None)(self.src, a, i)
        shared_gate = None
        if shared is not None:  # always resident, quantized like the experts
            shared = ExpertWeights(*(self.resident_matrix(arr, kind) for arr, kind in shared))
            if a.shared_gate:
                arr, kind = self.src.get(p + "mlp.shared_expert_gate.weight", (1, a.dim))
                shared_gate = np.ascontiguousarray(to_float32(arr, kind)[0])
        bq = bk = bv = None
        if a.qkv_bias:
            kv_dim = a.n_kv_heads * a.head_dim
            bq = self.vector(p + "self_attn.q_proj.bias", a.n_heads * a.head_dim)
            bk = self.vector(p + "self_attn.k_proj.bias", kv_dim)
            bv = self.vector(p + "self_attn.v_proj.bias", kv_dim)
        q_norm, k_norm = self.qk_norms(p)
        wq, wk, wv, mla = self.attention(p + "self_attn.")
        extras = getattr(module, "layer_extras", lambda *_: {})(self, i)
        return LayerWeights(
            **extras,
            q_norm=q_norm,
            k_norm=k_norm,
            attn_norm=self.vector(p + "input_layernorm.weight"),
            wq=wq,
            wk=wk,
            wv=wv,
            wo=self.matrix(p + "self_attn.o_proj.weight", (a.dim, a.value_dim)),
            ffn_norm=self.vector(p + "post_attention_layernorm.weight"),
            router=router,
            router_bias=bias,
            experts=[self.expert(triple) for triple in experts],
            shared=shared,
            shared_gate=shared_gate,
            bq=bq,
            bk=bk,
            bv=bv,
            mla=mla,
        )

    def attention(self, p: str):
        """wq, wk, wv and (latent attention) the MLAWeights of the layer at prefix `p`."""
        a = self.args
        if not a.mla:
            q_dim, kv_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
            return (
                self.matrix(p + "q_proj.weight", (q_dim, a.dim)),
                self.matrix(p + "k_proj.weight", (kv_dim, a.dim)),
                self.matrix(p + "v_proj.weight", (kv_dim, a.dim)),
                None,
            )
        q_dim, r, rope = a.n_heads * a.q_head_dim, a.kv_lora_rank, a.head_dim
        nope, vh = a.qk_nope_head_dim, a.v_head_dim
        wq_a = q_a_norm = None
        if a.q_lora_rank:
            wq_a = self.matrix(p + "q_a_proj.weight", (a.q_lora_rank, a.dim))
            q_a_norm = self.vector(p + "q_a_layernorm.weight", a.q_lora_rank)
            wq = self.matrix(p + "q_b_proj.weight", (q_dim, a.q_lora_rank))
        else:
            wq = self.matrix(p + "q_proj.weight", (q_dim, a.dim))
        kv_b, kind = self.src.get(p + "kv_b_proj.weight", (a.n_heads * (nope + vh), r))
        heads = kv_b.reshape(a.n_heads, nope + vh, r)
        mla = MLAWeights(
            wkv_a=self.matrix(p + "kv_a_proj_with_mqa.weight", (r + rope, a.dim)),
            kv_a_norm=self.vector(p + "kv_a_layernorm.weight", r),
            w_kb=[pack_float(np.ascontiguousarray(h[:nope].T), kind) for h in heads],
            w_vb=[pack_float(np.ascontiguousarray(h[nope:]), kind) for h in heads],
            wq_a=wq_a,
            q_a_norm=q_a_norm,
        )
        return wq, None, None, mla
