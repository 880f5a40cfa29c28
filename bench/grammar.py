"""Per-token cost of JSON-constrained decoding with three grammar libraries: llguidance,
xgrammar and outlines-core (mer.structured uses the one this picks).

For each library, vocabulary and grammar, a trial compiles the grammar (timed), then replays
the tokenization of valid JSON documents, each through a fresh matcher: at every step it times
computing the allowed-token mask (a bitmask, one bit per id, as each library writes it) and,
separately, advancing the matcher by the document's next token. Every replayed token must be
allowed, and at the end the tokenizer's EOS; a library that refuses one is reported. The
documents are seeded: any JSON objects of mixed shapes for the "any" grammar (OpenAI's
json_object), and objects satisfying a nested schema (objects, arrays of objects, enums,
strings, integers, numbers, booleans, optional fields) for "schema". They are written by
json.dumps with its default separators, which every library's default whitespace allows.

Vocabularies: SmolLM2-135M's (49,152 ids: the bundled model's GGUF) and Qwen2's (151,936 ids:
ggml-vocab-qwen2.gguf, the vocabulary-only GGUF that llama.cpp keeps for its tokenizer tests and
that ships in the llama-cpp-python source distribution on PyPI; fetched once with
`pip download` into the user's cache, or given with --qwen2 PATH). Both are loaded by mer and
turned into token bytes by mer.structured's adapter; each library gets them as it takes them
(llguidance through mer.structured, xgrammar as a raw byte vocabulary with special tokens
emptied, outlines-core as a Vocabulary without special tokens).

Settings: llguidance with mer.structured's JSON options, each matcher a copy of the compiled
start state (as mer uses it); xgrammar compiling with as many threads as CPUs, no cache;
outlines-core indexing the regular expression its json_schema module writes.

Trials rotate through the cells and repeat until every cell has --trials clean ones: trials
during which others used at most --clean of the CPUs (mer/bench/machine.py; steal time
counts). Per-token figures pool the steps of the clean trials; compile figures are their
median. Prints a table last.

    python bench/grammar.py [--trials 3] [--docs 12] [--libs llguidance,xgrammar,outlines-core]
                            [--vocabs 49k,152k] [--qwen2 PATH] [--clean 0.05]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from mer.bench.machine import CPUS, Share
from mer.models.loading import load_tokenizer
from mer.models.sources import bundled_models

LIBS = ("llguidance", "xgrammar", "outlines-core")
GRAMMARS = ("any", "schema")
QWEN2_MEMBER = "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
LLAMA_CPP_PYTHON = "0.3.36"  # the source distribution searched when llama-cpp-python is absent

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "email": {"type": "string"},
                "tier": {"enum": ["free", "pro", "enterprise"]},
            },
            "required": ["name", "tier"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "price": {"type": "number"},
                    "options": {"type": "array", "items": {"type": "string"}},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "total": {"type": "number"},
        "gift": {"type": "boolean"},
        "notes": {"type": "string"},
    },
    "required": ["id", "customer", "items", "status", "total"],
    "additionalProperties": False,
}
ANY = {"type": "object"}

WORDS = (
    "order customer river mill city train weather sunny rain model token price item note "
    "alpha beta gamma delta café naïve Zürich 東京 données über résumé value count total "
    "status red green blue small large fast slow north south east west"
).split()


# -- documents -----------------------------------------------------------------------------------


def _text(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(1, 7))
    text = " ".join(words)
    if rng.random() < 0.2:
        text += rng.choice(["\n", ' "quoted"', "\t", " 50% off!", " a\\b", " (2024-05-01)"])
    return text.capitalize() if rng.random() < 0.5 else text


def _number(rng: random.Random) -> int | float:
    kind = rng.random()
    if kind < 0.4:
        return rng.randint(-50, 5000)
    if kind < 0.8:
        return round(rng.uniform(-1000, 1000), rng.randint(1, 4))
    return rng.choice([0, 1e-05, 6.02e23, -2.5e-3, 1234567890123])


def _any_value(rng: random.Random, depth: int):
    kinds = ["str", "num", "bool", "null"] + (["obj", "arr"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return _text(rng)
    if kind == "num":
        return _number(rng)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "arr":
        return [_any_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return _any_object(rng, depth + 1)


def _any_object(rng: random.Random, depth: int = 0) -> dict:
    keys = rng.sample(WORDS, rng.randint(1 if depth else 3, 6))
    return {k.replace(" ", "_"): _any_value(rng, depth) for k in keys}


def _schema_doc(rng: random.Random) -> dict:
    customer = {"name": _text(rng)}
    if rng.random() < 0.6:
        customer["email"] = f"{rng.choice(WORDS)}@example.com"
    customer["tier"] = rng.choice(["free", "pro", "enterprise"])
    items = []
    for _ in range(rng.randint(1, 4)):
        item = {
            "sku": f"SKU-{rng.randint(100, 99999)}",
            "quantity": rng.randint(1, 12),
            "price": round(rng.uniform(0.5, 500), 2),
        }
        if rng.random() < 0.5:
            item["options"] = [rng.choice(WORDS) for _ in range(rng.randint(0, 3))]
        items.append(item)
    doc = {"id": rng.randint(1, 10**6), "customer": customer, "items": items}
    doc["status"] = rng.choice(["pending", "paid", "shipped", "cancelled"])
    doc["total"] = round(sum(i["price"] * i["quantity"] for i in items), 2)
    if rng.random() < 0.5:
        doc["gift"] = rng.random() < 0.5
    if rng.random() < 0.5:
        doc["notes"] = _text(rng)
    return doc


def documents(grammar: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"{grammar}:{seed}")
    make = _any_object if grammar == "any" else _schema_doc
    return [json.dumps(make(rng), ensure_ascii=False) for _ in range(n)]


# -- vocabularies --------------------------------------------------------------------------------


def qwen2_vocab(given: str | None) -> Path:
    """Qwen2's vocabulary-only GGUF: `given`, or extracted once from llama-cpp-python's source
    distribution (pip download) into the user's cache."""
    if given:
        return Path(given)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mer-bench"
    target = cache / "ggml-vocab-qwen2.gguf"
    if target.is_file():
        return target
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = LLAMA_CPP_PYTHON
    print(f"fetching llama-cpp-python {version}'s source distribution for the Qwen2 vocabulary")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
            + ["--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(QWEN2_MEMBER))
            cache.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member).read()
    part = target.with_suffix(".part")
    part.write_bytes(data)
    part.replace(target)
    return target


class Vocab:
    def __init__(self, label: str, path: Path) -> None:
        from mer.structured import token_bytes

        self.label = label
        self.tokenizer = load_tokenizer(path)
        self.tokens, self.special = token_bytes(self.tokenizer)
        self.size = self.tokenizer.vocab_size
        self.eos_ids = sorted(self.tokenizer.eos_token_ids)
        self.words = (self.size + 31) // 32


# -- the libraries -------------------------------------------------------------------------------


class LLGuidance:
    name = "llguidance"

    def __init__(self, vocab: Vocab) -> None:
        import llguidance

        from mer import structured

        self.llg = llguidance
        self.options = structured.JSON_OPTIONS
        self.tok = structured.lltokenizer(vocab.tokenizer)

    def compile(self, schema: dict):
        text = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=self.options)
        if err := self.llg.LLMatcher.validate_grammar(text, self.tok):
            raise RuntimeError(err)
        return self.llg.LLMatcher(self.tok, text, log_level=0)

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m, words: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)

    def advance(self, m, token: int) -> bool:
        return m.consume_token(token)


class XGrammar:
    name = "xgrammar"

    def __init__(self, vocab: Vocab) -> None:
        import xgrammar

        self.xgr = xgrammar
        tokens = [b"" if i in vocab.special else t for i, t in enumerate(vocab.tokens)]
        self.info = xgrammar.TokenizerInfo(
            tokens, xgrammar.VocabType.RAW, vocab_size=vocab.size, stop_token_ids=vocab.eos_ids
        )

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=CPUS, cache_enabled=False)
        return compiler.compile_json_schema(schema, strict_mode=schema is not ANY)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, words: np.ndarray) -> None:
        m.fill_next_token_bitmask(words.reshape(1, -1))

    def advance(self, m, token: int) -> bool:
        return m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, vocab: Vocab) -> None:
        import outlines_core

        self.oc = outlines_core
        eos = vocab.eos_ids[0]
        by_bytes: dict[bytes, list[int]] = {}
        for i, t in enumerate(vocab.tokens):
            if t and i not in vocab.special and i not in vocab.eos_ids:
                by_bytes.setdefault(t, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, by_bytes)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, m, words: np.ndarray) -> None:
        m.write_mask_into(words.ctypes.data, words.size, 4)

    def advance(self, m, token: int) -> bool:
        m.advance(token, return_tokens=False)
        return True


DRIVERS = {d.name: d for d in (LLGuidance, XGrammar, OutlinesCore)}


# -- trials --------------------------------------------------------------------------------------


def trial(lib, vocab: Vocab, schema: dict, docs: list[list[int]]) -> dict:
    """Compile, then replay every document; times in ns."""
    words = np.zeros(vocab.words, np.int32)
    eos = vocab.eos_ids[0]
    with Share() as share:
        t = time.perf_counter_ns()
        compiled = lib.compile(schema)
        compile_ns = time.perf_counter_ns() - t
        mask_ns, advance_ns, refused = [], [], 0
        for ids in docs:
            m = lib.matcher(compiled)
            for step, tid in enumerate([*ids, eos]):
                t0 = time.perf_counter_ns()
                lib.fill(m, words)
                t1 = time.perf_counter_ns()
                mask_ns.append(t1 - t0)
                if not (int(words[tid >> 5]) >> (tid & 31)) & 1:
                    refused += 1
                    break
                if step == len(ids):
                    break  # EOS allowed: the document is done
                t2 = time.perf_counter_ns()
                ok = lib.advance(m, tid)
                advance_ns.append(time.perf_counter_ns() - t2)
                if not ok:
                    refused += 1
                    break
    return {
        "compile_ns": compile_ns,
        "mask_ns": mask_ns,
        "advance_ns": advance_ns,
        "refused": refused,
        "others": share.others,
    }


def apply_cost(vocab: Vocab, repeat: int = 200) -> float:
    """µs that mer.structured takes to apply a computed mask to a logits row (same for all)."""
    from mer import structured

    grammar = structured.compile_schema(SCHEMA, vocab.tokenizer)
    m = grammar.matcher()
    m.allowed()
    logits = np.random.default_rng(0).standard_normal(vocab.size, dtype=np.float32)
    times = []
    for _ in range(repeat):
        row = logits.copy()
        t = time.perf_counter_ns()
        m.mask_logits(row)
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1e3


def pct(values: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) / 1e3 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="clean trials per cell")
    parser.add_argument("--max-rounds", type=int, default=8)
    parser.add_argument("--docs", type=int, default=12, help="documents per grammar")
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument("--vocabs", default="49k,152k")
    parser.add_argument("--grammars", default=",".join(GRAMMARS))
    parser.add_argument("--qwen2", help="ggml-vocab-qwen2.gguf (default: fetched and cached)")
    parser.add_argument("--clean", type=float, default=0.05, help="max others' CPU share")
    opts = parser.parse_args()
    libs = opts.libs.split(",")
    grammars = opts.grammars.split(",")
    sources = {"49k": ("SmolLM2 49k", lambda: bundled_models()[0].path)}
    sources["152k"] = ("Qwen2 152k", lambda: qwen2_vocab(opts.qwen2))

    vocabs, drivers, setup_s = {}, {}, {}
    for key in opts.vocabs.split(","):
        label, path = sources[key]
        vocabs[key] = Vocab(label, path())
        for lib in libs:
            t = time.perf_counter()
            drivers[key, lib] = DRIVERS[lib](vocabs[key])
            setup_s[key, lib] = time.perf_counter() - t
            print(f"{label}: {lib} tokenizer set up in {setup_s[key, lib]:.2f} s", flush=True)
    docs = {}
    for key, vocab in vocabs.items():
        for g in grammars:
            texts = documents(g, opts.docs)
            docs[key, g] = [vocab.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        n = {g: sum(map(len, docs[key, g])) for g in grammars}
        print(f"{vocab.label}: replayed tokens per trial {n}", flush=True)

    cells = [(v, g, lib) for v in vocabs for g in grammars for lib in libs]
    results: dict[tuple, list[dict]] = {c: [] for c in cells}
    for _ in range(opts.max_rounds):
        todo = [
            c for c in cells if sum(r["others"] <= opts.clean for r in results[c]) < opts.trials
        ]
        if not todo:
            break
        for v, g, lib in todo:
            r = trial(drivers[v, lib], vocabs[v], ANY if g == "any" else SCHEMA, docs[v, g])
            results[v, g, lib].append(r)
            mark = "" if r["others"] <= opts.clean else "  (noisy: dropped)"
            print(
                f"{vocabs[v].label} {g:6s} {lib:13s} compile {r['compile_ns'] / 1e6:9.1f} ms  "
                f"mask median {pct(r['mask_ns'], 50):7.1f} µs p99 {pct(r['mask_ns'], 99):8.1f} µs"
                f"  refused {r['refused']}  others {r['others']:.1%}{mark}",
                flush=True,
            )
    apply_us = {v: apply_cost(vocab) for v, vocab in vocabs.items()}

    print()
    for v, vocab in vocabs.items():
        print(
            f"{vocab.label}: applying a mask to a logits row (mer.structured) {apply_us[v]:.0f} µs"
        )
    print("per-token µs over clean trials; compile ms: median of clean trials")
    head = f"{'vocab':11s} {'grammar':7s} {'library':13s} {'mask med':>9s} {'mask p99':>9s}"
    print(f"{head} {'adv med':>8s} {'compile':>9s} {'refused':>7s} {'trials':>6s}")
    for v, g, lib in cells:
        clean = [r for r in results[v, g, lib] if r["others"] <= opts.clean]
        masks = [x for r in clean for x in r["mask_ns"]]
        advances = [x for r in clean for x in r["advance_ns"]]
        compile_ms = statistics.median(r["compile_ns"] for r in clean) / 1e6 if clean else None
        refused = max((r["refused"] for r in clean), default=0)
        print(
            f"{vocabs[v].label:11s} {g:7s} {lib:13s} {pct(masks, 50):9.1f} {pct(masks, 99):9.1f} "
            f"{pct(advances, 50):8.1f} "
            + (f"{compile_ms:9.1f}" if compile_ms is not None else f"{'-':>9s}")
            + f" {refused:7d} {len(clean):6d}"
        )


if __name__ == "__main__":
    main()
