"""Decode and prefill speed of mer (8-bit and float activations) against llama.cpp on the same
GGUF file, same threads, one run.

Every engine gets the same prompt: a timed prefill, then greedy decoding token by token (only
the decode steps timed). Repeats alternate between the engines; each repeat records the share
of the CPUs other processes used meanwhile, and only repeats where it stayed under --clean
count. Prints min / median / max tokens/s and mer ÷ llama.cpp last. For the larger models
of `mer bench` (Mixtral-, Qwen3-, DeepSeek-shaped, made by `mer synth`), pass --model.

    python bench/decode.py [--model PATH] [--threads N] [--tokens N] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import mer
from mer.bench.machine import Share
from mer.models.sources import resolve_model

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press. Within fifty years, "
    "presses were operating in more than two hundred European cities, and the cost of books fell"
)


def mer_run(model, ids: list[int], n_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill tok/s, decode tok/s, tokens)."""
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = model.forward(np.asarray(ids), cache, all_logits=False)[0]
    t1 = time.perf_counter()
    out = [int(np.argmax(logits))]
    for _ in range(n_tokens - 1):
        logits = model.forward(np.asarray(out[-1:]), cache, all_logits=False)[0]
        out.append(int(np.argmax(logits)))
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), (n_tokens - 1) / (t2 - t1), out


def llama_run(llm, ids: list[int], n_tokens: int) -> tuple[float, float, list[int]]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    out = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
    for _ in range(n_tokens - 1):
        llm.eval(out[-1:])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), (n_tokens - 1) / (t2 - t1), out


def spread(values: list[float]) -> str:
    if not values:
        return "no clean repeat"
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clean", type=float, default=0.05, help="most CPU share of others")
    opts = parser.parse_args()

    import llama_cpp

    from mer.kernels import matmul

    path = resolve_model(opts.model)
    engines = {}
    for mode in ("q8", "f32"):
        model = mer.load_model(path, threads=opts.threads, activations=mode)
        matmul.set_num_threads(opts.threads)
        model.warm_up()
        engines[f"mer, {mode} activations"] = (mer_run, model)
    ids = model.tokenizer.encode(PROMPT)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=len(ids) + opts.tokens + 16,
        n_threads=opts.threads,
        n_threads_batch=opts.threads,
        n_batch=512,
        verbose=False,
    )
    engines["llama.cpp"] = (llama_run, llm)
    for run, engine in engines.values():
        run(engine, ids, 4)  # compile and warm up
    rates: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in engines}
    tokens: dict[str, list[int]] = {}
    dropped = 0
    for _ in range(opts.repeat):
        for name, (run, engine) in engines.items():
            with Share() as share:
                prefill, decode, out = run(engine, ids, opts.tokens)
            if share.others > opts.clean:
                dropped += 1
                continue
            rates[name][0].append(prefill)
            rates[name][1].append(decode)
            tokens[name] = out
    theirs = tokens.get("llama.cpp", [])
    print(f"model: {path.name}, prompt {len(ids)} tokens, {opts.tokens} decoded greedily")
    print(f"threads: {opts.threads} for every engine; repeats dropped as unclean: {dropped}")
    print()
    print(f"{'engine':<24}{'prefill tok/s':>22}{'decode tok/s':>22}{'same tokens':>13}")
    for name, (pre, dec) in rates.items():
        same = np.mean(np.array(tokens.get(name, [])) == np.array(theirs)) if theirs else 0.0
        print(f"{name:<24}{spread(pre):>22}{spread(dec):>22}{same:>13.0%}")
    lp, ld = (statistics.median(v) if v else float("nan") for v in rates["llama.cpp"])
    for name, (pre, dec) in rates.items():
        if name != "llama.cpp" and pre and dec:
            mp, md = statistics.median(pre), statistics.median(dec)
            print(f"{name + ' ÷ llama.cpp':<36} prefill {mp / lp:.2f}   decode {md / ld:.2f}")


if __name__ == "__main__":
    main()
