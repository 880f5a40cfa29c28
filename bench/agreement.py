"""How closely mer's logits follow llama.cpp's, next to how closely llama.cpp's own settings
follow its default, on the same GGUF file (default: the bundled SmolLM2).

Teacher-forced: each prompt of tests/models/test_smollm2.py followed by llama.cpp's own greedy
continuation, then every position's top-1 agreement and KL(x || llama.cpp default) in nats.
The rows: mer in each activation mode, and llama.cpp evaluating token by token (n_batch 1),
with a float32 KV cache, with flash attention and on one thread. A row far below llama.cpp's
own spread would point at a difference in mer; one within it says the model's logits are that
sensitive to any change of arithmetic.

    python bench/agreement.py [--model PATH] [--tokens N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import llama_cpp
import numpy as np

import mer
from mer.models.sources import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' prompts and helpers
from tests.models.test_smollm2 import CONTINUATION, PROMPTS  # noqa: E402
from tests.support import llamacpp  # noqa: E402

VARIANTS = {
    "llama.cpp, token by token": dict(n_batch=1, n_ubatch=1),
    "llama.cpp, float32 KV cache": dict(type_k=0, type_v=0),
    "llama.cpp, flash attention": dict(flash_attn=True),
    "llama.cpp, 1 thread": dict(n_threads=1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a GGUF file (default: the bundled model)")
    ap.add_argument("--tokens", type=int, default=CONTINUATION, help="greedy tokens per prompt")
    a = ap.parse_args()
    path = resolve_model(a.model)
    ref = llamacpp.load(path)
    tokenizer = mer.load_model(path, activations="f32").tokenizer
    seqs = []
    for text in PROMPTS:
        ids = tokenizer.encode(text)
        seqs.append(ids + llamacpp.greedy(ref, ids, a.tokens))
    base = [llamacpp.logits(ref, s) for s in seqs]
    rows = []

    def measure(name: str, logits) -> None:
        pairs = [llamacpp.agreement(logits(s), b) for s, b in zip(seqs, base, strict=True)]
        rows.append((name, np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])))
        print(f"{name}: top-1 {rows[-1][1]:.4f}, KL {rows[-1][2]:.5f}", flush=True)

    for mode in ("q8", "f32"):
        model = mer.load_model(path, activations=mode)
        measure(f"mer, {mode} activations", model.logits)
    for name, settings in VARIANTS.items():
        kw = {"n_threads": 2, **settings}
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, **kw)
        measure(name, lambda s, llm=llm: llamacpp.logits(llm, s))
    print(f"\nAgainst llama.cpp's default ({path.name}, {len(seqs)} prompts + {a.tokens} tokens)")
    print("| engine | top-1 | mean KL |\n|---|---|---|")
    for name, top1, kl in rows:
        print(f"| {name} | {top1:.4f} | {kl:.5f} |")


if __name__ == "__main__":
    main()
