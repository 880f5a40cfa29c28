"""Load a GGUF file (architectures llama, mixtral, qwen2moe, qwen3moe, olmoe, deepseek2,
gpt-oss) into kernel-ready weights and a tokenizer.

For llama and mixtral, llama.cpp's converter permutes the rows of the Q and K projections so
that RoPE rotates adjacent pairs; mer keeps the file's rows and rotates adjacent pairs too
(dot products between queries and keys are the same either way). qwen2moe, qwen3moe and
olmoe keep Hugging Face's rows and rotate halves (llama.cpp's NEOX rope). What llama.cpp
fixes per architecture rather than recording in the file, mer fixes the same way: qwen3moe
renormalises its top-k routing weights, qwen2moe and olmoe do not.

deepseek2 (DeepSeek-V2, -V3, R1) records its routing in the file (gating function, groups,
renormalisation, scale) and keeps kv_b_proj split per head (attn_k_b transposed, attn_v_b), as
mer's absorbed latent attention uses it; older files with one attn_kv_b are split on loading.
llama.cpp ranks expert groups by their two best scores whatever the gating function, and
rotates adjacent pairs; mer does the same for these files.

gpt-oss keeps transformers' layout with gate and up split apart (experts usually MXFP4), its
sliding-window layers given by `attention.sliding_window_pattern` (a period, or a flag per
layer; llama.cpp's default: every other layer from the first), its SwiGLU clamped at 7.0 as
llama.cpp fixes it, and the router's top-k logits softmaxed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from mer.errors import ModelFormatError
from mer.io.gguf import GGUFFile
from mer.io.raw import to_float32
from mer.kernels.matmul import PackedWeight, dequantize, from_gguf_blocks, pack_float
from mer.models.args import ModelArgs, RopeArgs, naming, yarn_mscale
from mer.models.gguf_vocab import build_tokenizer
from mer.models.weights import (
    Embedding,
    ExpertBiases,
    ExpertWeights,
    LayerWeights,
    MatrixSpec,
    MLAWeights,
    ModelWeights,
)
from mer.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "mixtral", "qwen2moe", "qwen3moe", "olmoe", "deepseek2", "gpt-oss")
_QK_NORM = {"qwen3moe": "head", "olmoe": "full"}  # RMSNorm of queries and keys before RoPE
# renormalise the top-k routing weights (llama.cpp's norm_w)
_NORM_TOPK = {"olmoe": False, "qwen2moe": False}
FLOAT_KINDS = ("f32", "f16", "bf16")
_FFN_NORM = {"gptoss": "post_attention_norm"}  # the FFN's norm where llama.cpp names it apart


def load_gguf(path: Path, stream: bool = False) -> tuple[ModelArgs, ModelWeights, Tokenizer]:
    """Arguments, weights and tokenizer of a GGUF file. With `stream`, experts are not loaded:
    each layer lists where its experts lie in the file (ExpertSpec)."""
    gg = GGUFFile(path)
    arch = gg.meta("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelFormatError(
            f"{path}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    args = _args(gg, arch)
    tokenizer = gguf_tokenizer(gg)
    weights = _Loader(gg, args, stream).model()
    gg.drop_metadata()  # the vocabulary's fields alone take ~150 MB for 50k tokens
    gg.drop_pages()  # packing read them; what stays a view of the file faults back in
    return args, weights, tokenizer


def gguf_tokenizer(gg: GGUFFile) -> Tokenizer:
    """The tokenizer that GGUF file `gg`'s metadata describes."""
    backend, add_bos = build_tokenizer(gg)
    tokens = gg.meta("tokenizer.ggml.tokens")
    bos_id, eos_id, eot_id = (
        _token_id(gg, f"tokenizer.ggml.{name}_token_id", len(tokens))
        for name in ("bos", "eos", "eot")
    )
    return Tokenizer.from_parts(
        backend,
        bos_token=tokens[bos_id] if bos_id is not None else None,
        eos_token=tokens[eos_id] if eos_id is not None else None,
        chat_template=gg.meta("tokenizer.chat_template", None),
        eos_token_ids=[i for i in (eos_id, eot_id) if i is not None],
        add_bos=add_bos,
    )


def _token_id(gg: GGUFFile, key: str, vocab_size: int) -> int | None:
    """Special token id `key` from the metadata, checked against the vocabulary."""
    value = gg.meta(key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ModelFormatError(
            f"{gg.path}: metadata {key} = {value!r} is not a token id "
            f"(the vocabulary has {vocab_size} tokens)"
        )
    return value


def _args(gg: GGUFFile, arch: str) -> ModelArgs:
    try:
        with naming(str(gg.path)):
            return _read_args(gg, arch)
    except (TypeError, ValueError, OverflowError) as err:
        raise ModelFormatError(f"{gg.path}: malformed {arch} metadata ({err})") from None


def _read_args(gg: GGUFFile, arch: str) -> ModelArgs:
    def m(key: str, default=...):
        return gg.meta(f"{arch}.{key}", default)

    dim, n_heads = int(m("embedding_length")), int(m("attention.head_count"))
    head_dim = int(m("attention.key_length", dim // n_heads))
    if arch == "deepseek2":
        head_dim = int(m("rope.dimension_count"))  # the rotary part of a query head
    scaling = m("rope.scaling.type", "none")
    yarn_ok = arch in ("deepseek2", "gpt-oss")
    if scaling not in ("none", "linear") and not (yarn_ok and scaling == "yarn"):
        raise ModelFormatError(f"{gg.path}: rope scaling {scaling!r} is not supported")
    factors = None
    if gg.has("rope_freqs.weight"):
        raw, kind = gg.tensor("rope_freqs.weight", (head_dim // 2,))
        factors = tuple(float(f) for f in to_float32(raw, kind))
    rope = RopeArgs(
        theta=float(m("rope.freq_base", 10000.0)),
        scaling=scaling if scaling in ("linear", "yarn") else "default",
        factor=float(m("rope.scaling.factor", 1.0)),
        original_max_position_embeddings=int(m("rope.scaling.original_context_length", 8192)),
        interleaved=arch in ("llama", "mixtral", "deepseek2"),
        freq_factors=factors,
    )
    if arch == "gpt-oss" and scaling == "yarn":  # ggml's YaRN scales cos and sin itself
        rope = replace(rope, attention_factor=yarn_mscale(rope.factor))
    n_experts = int(m("expert_count", 1) or 1)
    moe_ffn = ("qwen2moe", "qwen3moe", "deepseek2", "gpt-oss")
    ffn = m("expert_feed_forward_length", None) if arch in moe_ffn else None
    kind = {"gpt-oss": "gptoss"}.get(arch, arch)
    if arch in ("llama", "mixtral"):  # llama.cpp writes Mixtral as "llama" with experts
        kind = "mixtral" if n_experts > 1 else "llama"
    fields = dict(
        arch=kind,
        vocab_size=int(m("vocab_size", len(gg.meta("tokenizer.ggml.tokens")))),
        dim=dim,
        n_layers=int(m("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(m("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(ffn if ffn is not None else m("feed_forward_length")),
        n_experts=n_experts,
        n_experts_per_tok=int(m("expert_used_count", 1) or 1),
        norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(m("context_length", 4096)),
        tie_embeddings=not gg.has("output.weight"),
        rope=rope,
        qk_norm=_QK_NORM.get(arch),
        norm_topk_prob=_NORM_TOPK.get(arch, True),
    )
    if arch == "deepseek2":
        fields.update(_deepseek2(gg, m, rope, head_dim))
    if arch == "gpt-oss":
        fields.update(_gpt_oss(gg, m, int(fields["n_layers"])))
    if arch == "qwen2moe":  # a gated shared expert, biases on q, k and v
        fields.update(
            shared_ffn_dim=int(m("expert_shared_feed_forward_length")),
            shared_gate=True,
            qkv_bias=gg.has("blk.0.attn_q.bias"),
        )
    return ModelArgs(**fields)


_GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's expert_gating_func


def _deepseek2(gg: GGUFFile, m, rope: RopeArgs, rope_dim: int) -> dict:
    """The ModelArgs fields of a deepseek2 file beyond the common ones."""
    gating = int(m("expert_gating_func", 1))  # absent in early V2 files: softmax
    if gating not in _GATING:
        raise ModelFormatError(f"{gg.path}: expert gating function {gating} is not supported")
    nope = int(m("attention.key_length_mla")) - rope_dim
    first_dense = int(m("leading_dense_block_count", 0))
    expert_ffn = int(m("expert_feed_forward_length"))
    moe_layer = f"blk.{first_dense}."
    scale = (nope + rope_dim) ** -0.5
    if rope.scaling == "yarn":  # llama.cpp: mscale = 1 + yarn_log_multiplier * ln(factor)
        scale *= (
            1.0 + float(m("rope.scaling.yarn_log_multiplier", 0.0)) * math.log(rope.factor)
        ) ** 2
    return dict(
        n_kv_heads=1,
        scoring=_GATING[gating],
        router_bias=gg.has(moe_layer + "exp_probs_b.bias"),
        n_group=int(m("expert_group_count", 1) or 1),
        topk_group=int(m("expert_group_used_count", 1) or 1),
        group_score="top2",
        routed_scale=float(m("expert_weights_scale", 1.0)),
        norm_topk_prob=bool(m("expert_weights_norm", False)),
        first_dense_layers=first_dense,
        dense_ffn_dim=int(m("feed_forward_length")) if first_dense else 0,
        shared_ffn_dim=expert_ffn * int(m("expert_shared_count", 0)),
        q_lora_rank=int(m("attention.q_lora_rank", 0) or 0),
        kv_lora_rank=int(m("attention.kv_lora_rank")),
        qk_nope_head_dim=nope,
        v_head_dim=int(m("attention.value_length_mla")),
        softmax_scale=scale,
    )


def _gpt_oss(gg: GGUFFile, m, n_layers: int) -> dict:
    """The ModelArgs fields of a gpt-oss file beyond the common ones."""
    pattern = m("attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):  # a flag per layer: True where the window applies
        if len(pattern) != n_layers:
            raise ModelFormatError(f"{gg.path}: sliding_window_pattern does not cover the layers")
        sliding = [bool(x) for x in pattern]
    else:  # llama.cpp's period n: layers il % n < n - 1 slide
        n = int(pattern)
        sliding = [n == 0 or i % n < n - 1 for i in range(n_layers)]
    window = int(m("attention.sliding_window", 0) or 0) or None
    return dict(
        sliding_window=window if any(sliding) else None,
        full_attention_layers=tuple(i for i, s in enumerate(sliding) if not s) if window else (),
        qkv_bias=gg.has("blk.0.attn_q.bias"),
        o_bias=gg.has("blk.0.attn_output.bias"),
        sinks=True,
        router_logit_bias=True,
        expert_bias=True,
        swiglu_limit=7.0,  # llama.cpp's constant for this architecture
        norm_topk_prob=True,
    )


class _Loader:
    def __init__(self, gg: GGUFFile, args: ModelArgs, stream: bool = False) -> None:
        self.gg, self.args, self.stream = gg, args, stream

    def matrix(self, name: str, rows: int, cols: int) -> PackedWeight:
        raw, kind = self.gg.tensor(name, (rows, cols))
        return self.pack(raw, kind, rows, cols)

    def expert_matrix(self, raw: np.ndarray, kind: str, rows: int, cols: int):
        """A PackedWeight, or with `stream` a MatrixSpec saying where the bytes lie."""
        if self.stream:
            return MatrixSpec(self.gg.path, self.gg.locate(raw), raw.nbytes, kind, rows, cols)
        return self.pack(raw, kind, rows, cols)

    def expert(self, gate, up, down):
        return (gate, up, down) if self.stream else ExpertWeights(gate, up, down)

    @staticmethod
    def pack(raw: np.ndarray, kind: str, rows: int, cols: int) -> PackedWeight:
        if kind in FLOAT_KINDS:
            return pack_float(np.ascontiguousarray(raw), kind)
        return from_gguf_blocks(np.ascontiguousarray(raw), kind, rows, cols)

    def vector(self, name: str, *shape: int) -> np.ndarray:
        """A float tensor (1-D: [length]; more dimensions as given) as float32."""
        raw, kind = self.gg.tensor(name, shape)
        if kind not in FLOAT_KINDS:
            raise ModelFormatError(
                f"{self.gg.path}: tensor {name} should not be quantized ({kind})"
            )
        return np.ascontiguousarray(to_float32(raw, kind))

    def model(self) -> ModelWeights:
        a = self.args
        embed_raw, embed_kind = self.gg.tensor("token_embd.weight", (a.vocab_size, a.dim))
        head_name = "token_embd.weight" if a.tie_embeddings else "output.weight"
        return ModelWeights(
            embed=Embedding(embed_raw, embed_kind, a.vocab_size, a.dim),
            layers=[self.layer(i) for i in range(a.n_layers)],
            norm=self.vector("output_norm.weight", a.dim),
            lm_head=self.matrix(head_name, a.vocab_size, a.dim),
        )

    def layer(self, i: int) -> LayerWeights:
        if self.args.mla:
            return self.deepseek2_layer(i)
        a = self.args
        p = f"blk.{i}."
        q_dim, kv_dim = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        router = self.router(p) if a.is_moe else None
        q_norm = k_norm = None
        if a.qk_norm is not None:
            full = a.qk_norm == "full"
            q_norm = self.vector(p + "attn_q_norm.weight", q_dim if full else a.head_dim)
            k_norm = self.vector(p + "attn_k_norm.weight", kv_dim if full else a.head_dim)
        bq = bk = bv = shared = shared_gate = None
        if a.qkv_bias:
            bq = self.vector(p + "attn_q.bias", q_dim)
            bk = self.vector(p + "attn_k.bias", kv_dim)
            bv = self.vector(p + "attn_v.bias", kv_dim)
        if a.shared_ffn_dim:
            shared = self.resident_ffn(p, "_shexp", a.shared_ffn_dim)
            raw, kind = self.gg.tensor(p + "ffn_gate_inp_shexp.weight", (1, a.dim))
            shared_gate = np.ascontiguousarray(dequantize(self.pack(raw, kind, 1, a.dim))[0])
        extras = self.gpt_oss_extras(p) if a.arch == "gptoss" else {}
        return LayerWeights(
            **extras,
            bq=bq,
            bk=bk,
            bv=bv,
            shared=shared,
            shared_gate=shared_gate,
            q_norm=q_norm,
            k_norm=k_norm,
            attn_norm=self.vector(p + "attn_norm.weight", a.dim),
            wq=self.matrix(p + "attn_q.weight", q_dim, a.dim),
            wk=self.matrix(p + "attn_k.weight", kv_dim, a.dim),
            wv=self.matrix(p + "attn_v.weight", kv_dim, a.dim),
            wo=self.matrix(p + "attn_output.weight", a.dim, q_dim),
            ffn_norm=self.vector(p + _FFN_NORM.get(a.arch, "ffn_norm") + ".weight", a.dim),
            router=router,
            experts=self.experts(p) if a.is_moe else [self.dense_ffn(p)],
        )

    def gpt_oss_extras(self, p: str) -> dict:
        a = self.args
        e, f = a.n_experts, a.ffn_dim
        return dict(
            bo=self.vector(p + "attn_output.bias", a.dim) if a.o_bias else None,
            sinks=self.vector(p + "attn_sinks.weight", a.n_heads),
            router_logit_bias=self.vector(p + "ffn_gate_inp.bias", e),
            expert_biases=ExpertBiases(
                self.vector(p + "ffn_gate_exps.bias", e, f),
                self.vector(p + "ffn_up_exps.bias", e, f),
                self.vector(p + "ffn_down_exps.bias", e, a.dim),
                a.swiglu_limit,
            ),
        )

    def router(self, p: str) -> np.ndarray:
        a = self.args
        raw, kind = self.gg.tensor(p + "ffn_gate_inp.weight", (a.n_experts, a.dim))
        return np.ascontiguousarray(dequantize(self.pack(raw, kind, a.n_experts, a.dim)))

    def deepseek2_layer(self, i: int) -> LayerWeights:
        a = self.args
        p = f"blk.{i}."
        d, h, r, nope, vh = a.dim, a.n_heads, a.kv_lora_rank, a.qk_nope_head_dim, a.v_head_dim
        q_dim = h * a.q_head_dim
        if a.q_lora_rank:
            wq = self.matrix(p + "attn_q_b.weight", q_dim, a.q_lora_rank)
        else:
            wq = self.matrix(p + "attn_q.weight", q_dim, d)
        if self.gg.has(p + "attn_k_b.weight"):
            k_b, k_kind = self.gg.tensor(p + "attn_k_b.weight", (h, r, nope))
            v_b, v_kind = self.gg.tensor(p + "attn_v_b.weight", (h, vh, r))
            w_kb = [self.pack(k_b[j], k_kind, r, nope) for j in range(h)]
            w_vb = [self.pack(v_b[j], v_kind, vh, r) for j in range(h)]
        else:  # older files: kv_b_proj whole, [H * (nope + vh), r]
            kv_b = dequantize(self.matrix(p + "attn_kv_b.weight", h * (nope + vh), r))
            heads = kv_b.reshape(h, nope + vh, r)
            w_kb = [pack_float(np.ascontiguousarray(x[:nope].T), "f32") for x in heads]
            w_vb = [pack_float(np.ascontiguousarray(x[nope:]), "f32") for x in heads]
        mla = MLAWeights(
            wkv_a=self.matrix(p + "attn_kv_a_mqa.weight", r + a.head_dim, d),
            kv_a_norm=self.vector(p + "attn_kv_a_norm.weight", r),
            w_kb=w_kb,
            w_vb=w_vb,
            wq_a=self.matrix(p + "attn_q_a.weight", a.q_lora_rank, d) if a.q_lora_rank else None,
            q_a_norm=self.vector(p + "attn_q_a_norm.weight", a.q_lora_rank)
            if a.q_lora_rank
            else None,
        )
        dense = a.is_dense_layer(i)
        if dense:
            shared = self.resident_ffn(p, "", a.dense_ffn_dim)
        elif a.shared_ffn_dim:
            shared = self.resident_ffn(p, "_shexp", a.shared_ffn_dim)
        else:
            shared = None
        return LayerWeights(
            attn_norm=self.vector(p + "attn_norm.weight", d),
            wq=wq,
            wk=None,
            wv=None,
            wo=self.matrix(p + "attn_output.weight", d, a.value_dim),
            ffn_norm=self.vector(p + "ffn_norm.weight", d),
            router=None if dense else self.router(p),
            router_bias=self.vector(p + "exp_probs_b.bias", a.n_experts)
            if a.router_bias and not dense
            else None,
            experts=[] if dense else self.experts(p),
            mla=mla,
            shared=shared,
        )

    def resident_ffn(self, p: str, suffix: str, width: int) -> ExpertWeights:
        d = self.args.dim
        return ExpertWeights(
            self.matrix(f"{p}ffn_gate{suffix}.weight", width, d),
            self.matrix(f"{p}ffn_up{suffix}.weight", width, d),
            self.matrix(f"{p}ffn_down{suffix}.weight", d, width),
        )

    def one_matrix(self, name: str, rows: int, cols: int):
        raw, kind = self.gg.tensor(name, (rows, cols))
        return self.expert_matrix(raw, kind, rows, cols)

    def dense_ffn(self, p: str):
        d, f = self.args.dim, self.args.ffn_dim
        return self.expert(
            self.one_matrix(p + "ffn_gate.weight", f, d),
            self.one_matrix(p + "ffn_up.weight", f, d),
            self.one_matrix(p + "ffn_down.weight", d, f),
        )

    def experts(self, p: str) -> list:
        d, f, n = self.args.dim, self.args.ffn_dim, self.args.n_experts
        if not self.gg.has(p + "ffn_gate_exps.weight"):  # older files: one tensor per expert
            return [
                self.expert(
                    self.one_matrix(f"{p}ffn_gate.{e}.weight", f, d),
                    self.one_matrix(f"{p}ffn_up.{e}.weight", f, d),
                    self.one_matrix(f"{p}ffn_down.{e}.weight", d, f),
                )
                for e in range(n)
            ]
        gate, g_kind = self.gg.tensor(p + "ffn_gate_exps.weight", (n, f, d))
        up, u_kind = self.gg.tensor(p + "ffn_up_exps.weight", (n, f, d))
        down, d_kind = self.gg.tensor(p + "ffn_down_exps.weight", (n, d, f))
        return [
            self.expert(
                self.expert_matrix(gate[e], g_kind, f, d),
                self.expert_matrix(up[e], u_kind, f, d),
                self.expert_matrix(down[e], d_kind, d, f),
            )
            for e in range(n)
        ]
