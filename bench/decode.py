"""Decode speed of mer against llama.cpp on the same GGUF file, same threads, one run.

Both engines get the same prompt, prefill it, then decode greedily token by token; only
the decode steps are timed. Prints a short table last.

    python bench/decode.py [--model PATH] [--threads N] [--tokens N] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import mer
from mer.models.sources import resolve_model
from mer.sampling import SamplingParams

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press. Within fifty years,"
)


def mer_decode(model, ids: list[int], n_tokens: int) -> tuple[float, list[int]]:
    """Decode tokens/s (prefill excluded) and the tokens."""
    stamps: list[float] = []
    out: list[int] = []
    for token in model.generate(
        ids, SamplingParams(temperature=0.0), n_tokens, stop_ids=frozenset()
    ):
        stamps.append(time.perf_counter())
        out.append(token)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def llama_decode(llm, ids: list[int], n_tokens: int) -> tuple[float, list[int]]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    stamps: list[float] = []
    for _ in range(n_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        stamps.append(time.perf_counter())
        out.append(token)
        llm.eval([token])
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()

    import llama_cpp

    path = resolve_model(opts.model)
    model = mer.load_model(path, threads=opts.threads)
    ids = model.tokenizer.encode(PROMPT)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        n_threads=opts.threads,
        n_threads_batch=opts.threads,
        logits_all=True,
        verbose=False,  # keeps a logits row per position
    )
    mer_decode(model, ids, 4)  # compile and warm up
    llama_decode(llm, ids, 4)
    mer_rates, llama_rates = [], []
    same = 0.0
    for _ in range(opts.repeat):
        rate_l, toks_l = llama_decode(llm, ids, opts.tokens)
        rate_m, toks_m = mer_decode(model, ids, opts.tokens)
        llama_rates.append(rate_l)
        mer_rates.append(rate_m)
        same = float(np.mean(np.array(toks_m) == np.array(toks_l)))
    m, l_ = statistics.median(mer_rates), statistics.median(llama_rates)
    print(f"model: {path.name}, prompt {len(ids)} tokens, {opts.tokens} decoded")
    print(f"threads: {opts.threads} for both engines")
    print(f"greedy tokens identical to llama.cpp's: {same:.0%}")
    print()
    print(f"{'engine':<12}{'decode tok/s':>14}")
    print(f"{'llama.cpp':<12}{l_:>14.1f}")
    print(f"{'mer':<12}{m:>14.1f}")
    print(f"{'ratio':<12}{m / l_:>14.2f}")


if __name__ == "__main__":
    main()
