"""Build a `tokenizers.Tokenizer` from the vocabulary stored in GGUF metadata.

Two vocabulary models are stored there:
- "gpt2": byte-level BPE with an explicit merge list (SmolLM2, Llama 3, Qwen);
- "llama": SentencePiece BPE, tokens with scores and byte-fallback pieces <0xNN> (Mixtral,
  Llama 2). SentencePiece merges the adjacent pair whose merged piece scores highest, which
  is BPE with merges ranked by the merged piece's score.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from mer.errors import ModelFormatError
from mer.io.gguf import GGUFFile

# token types in tokenizer.ggml.token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns by tokenizer.ggml.pre, as the original tokenizers define them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    patterns = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2}
    if pre not in patterns:
        raise ModelFormatError(f"pre-tokenizer {pre!r} is not supported")
    split = pre_tokenizers.Split(Regex(patterns[pre]), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, byte_level])


def build_tokenizer(gg: GGUFFile) -> tuple[Tokenizer, bool]:
    """The tokenizer and whether llama.cpp adds BOS to a plain prompt."""
    kind = gg.meta("tokenizer.ggml.model")
    tokens: list[str] = _meta_list(gg, "tokenizer.ggml.tokens", str)
    types: list[int] = _meta_list(gg, "tokenizer.ggml.token_type", int, len(tokens), NORMAL)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if kind == "gpt2":
        merges = _meta_list(gg, "tokenizer.ggml.merges", str)
        if not all(" " in m for m in merges):
            raise ModelFormatError(f"{gg.path}: tokenizer.ggml.merges must be pairs 'a b'")
        merges = [tuple(m.split(" ", 1)) for m in merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _byte_level_pre(gg.meta("tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":
        scores: list[float] = _meta_list(gg, "tokenizer.ggml.scores", float, len(tokens))
        unk_id = gg.meta("tokenizer.ggml.unknown_token_id", 0)
        if not isinstance(unk_id, int) or not 0 <= unk_id < len(tokens):
            raise ModelFormatError(
                f"{gg.path}: tokenizer.ggml.unknown_token_id = {unk_id!r} is not a token id"
            )
        tok = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=_merges_by_score(tokens, scores, types),
                unk_token=tokens[unk_id],
                byte_fallback=True,
                fuse_unk=True,
            )
        )
        prefix = gg.meta("tokenizer.ggml.add_space_prefix", True)
        tok.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
        )
        strip = [decoders.Strip(content=" ", left=1)] if prefix else []
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
        )
        add_bos_default = True
    else:
        raise ModelFormatError(f"{gg.path}: tokenizer model {kind!r} is not supported")
    specials = [
        AddedToken(t, special=(ty == CONTROL), normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (CONTROL, USER_DEFINED)
    ]
    tok.add_special_tokens([s for s in specials if s.special])
    tok.add_tokens([s for s in specials if not s.special])
    return tok, bool(gg.meta("tokenizer.ggml.add_bos_token", add_bos_default))


def _meta_list(
    gg: GGUFFile, key: str, kind: type, length: int | None = None, fill: object = ...
) -> list:
    """Metadata list `key` of `kind` items (ints count as floats), of `length` if given;
    `fill` repeated to that length when the key is absent, if given."""
    if fill is not ... and gg.meta(key, None) is None:
        return [fill] * (length or 0)
    value = gg.meta(key)
    kinds = (int, float) if kind is float else (kind,)
    if not isinstance(value, list) or not all(isinstance(v, kinds) for v in value):
        raise ModelFormatError(f"{gg.path}: metadata {key} must be a list of {kind.__name__}")
    if length is not None and len(value) != length:
        raise ModelFormatError(
            f"{gg.path}: metadata {key} has {len(value)} entries for {length} tokens"
        )
    return value


def _merges_by_score(
    tokens: list[str], scores: list[float], types: list[int]
) -> list[tuple[str, str]]:
    # Every split of a normal piece into two pieces of the vocabulary is a merge; pieces that
    # score higher merge first, ties broken by id.
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[pid], pid, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]
