"""A tiny Mixtral, trained briefly, converted and quantized by llama.cpp's own tools.

Built once per test session (tests/conftest.py) and shared by the GGUF and store tests.
"""

from __future__ import annotations

from pathlib import Path

from sentencepiece import SentencePieceProcessor

from tests.support import llamacpp
from tests.support.hf_models import CONFIGS, build_model, save_model, train_briefly
from tests.support.tokenizers import write_sentencepiece

# K-quants need rows that are multiples of 256.
CONFIGS["mixtral-gguf"] = dict(
    arch="mixtral",
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
KINDS = ["f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m"]
TEXTS = [
    "the quick brown fox jumps over the lazy dog and runs into the forest where the trees are tall",
    "once upon a time there was a small village by the sea where fishermen told stories every night",
    "numbers like 12345 and 67890 appear in the text, together with symbols such as % & and #",
    "she sells sea shells by the sea shore, and the shells she sells are surely sea shells",
    "a model with many experts routes each token to a few of them and adds their weighted outputs",
    "rain fell on the roof all night long while the wind whistled through the gaps in the old window",
    "the library opens at nine in the morning and closes at six in the evening on most weekdays",
    "water boils at one hundred degrees at sea level, but at lower temperatures on high mountains",
    "to be or not to be, that is the question: whether it is nobler in the mind to suffer",
    "the train left the station on time, crossed the river and reached the city before noon",
]
CONTINUATION = 32


def prompts(model, length: int) -> list[list[int]]:
    """Each of TEXTS in `model`'s tokenizer, repeated to at least `length` tokens."""
    out = []
    for text in TEXTS:
        ids = model.tokenizer.encode(text)
        while len(ids) < length:
            ids = ids + model.tokenizer.encode(" " + text, add_special_tokens=False)
        out.append(ids)
    return out


def build(root: Path, cache_dir: Path) -> tuple[object, dict[str, Path]]:
    """(transformers model holding the F16-rounded weights, {kind: gguf path})."""
    hf_dir = root / "hf"
    # A SentencePiece model, as Mixtral ships: the converter keeps its merge scores.
    sp = SentencePieceProcessor(model_file=str(write_sentencepiece(hf_dir)))
    # one embedding row per token of the vocabulary, as llama.cpp requires
    hf = build_model("mixtral-gguf", vocab_size=sp.vocab_size(), init_std=0.03)
    train_briefly(hf, [[sp.bos_id(), *sp.encode(t)] for t in TEXTS])
    save_model(hf, hf_dir, "f16")
    return hf, llamacpp.gguf_files(hf_dir, root, cache_dir, KINDS)
