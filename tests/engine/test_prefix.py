"""Prefix caching: requests that share a long system prompt, a conversation's next turn and
eviction under a small KV budget give the same tokens and bit-identical logits with the cache
as without it, while feeding far fewer tokens through the model (counted, not timed); the
block index on its own: chained keys, lookups, LRU eviction, pins."""

from __future__ import annotations

import numpy as np
import pytest

import mer
from mer.engine.engine import Engine
from mer.engine.prefix import BLOCK_SIZE, PrefixCache, block_key
from mer.engine.scheduler import SchedulerConfig
from mer.models.sources import bundled_models
from mer.models.transformer import KVCache
from mer.sampling import SamplingParams

TOKENS = 20  # generated per request

SENTENCES = [
    "You are Quill, the reading assistant of a small public library in a coastal town.",
    "You help visitors find books, explain how the catalogue works, and answer questions "
    "about opening hours, membership, events and the building itself.",
    "Be brief, friendly and exact; when you do not know something, say so and suggest asking "
    "at the front desk.",
    "Opening hours: Monday to Friday from nine in the morning to seven in the evening, "
    "Saturday from ten to four, closed on Sunday and on public holidays.",
    "Membership is free for residents, who need a proof of address; visitors may join for "
    "twelve pounds a year.",
    "Members may borrow up to eight items at a time: books for three weeks, films and games "
    "for one week.",
    "Items can be renewed twice online or at the desk unless someone else has reserved them.",
    "Late returns cost twenty pence a day per item, capped at five pounds.",
    "The children's corner is on the ground floor beside the garden door; the local history "
    "room, with maps, parish records and old newspapers, is on the first floor and opens by "
    "appointment.",
    "There are six public computers, free for members for two hours a day, and a printer "
    "that costs ten pence a page.",
    "Events this month: a poetry evening on the first Thursday, a knitting circle every "
    "Tuesday afternoon, story time for under-fives on Wednesday and Friday mornings, and a "
    "talk on the history of the harbour lighthouse on the last Saturday.",
    "Never share a member's details, loans or reservations with anyone but that member, and "
    "never promise that a reserved item will arrive by a given date.",
]
SYSTEM = " ".join(SENTENCES)  # about 320 tokens
OTHER_SYSTEM = " ".join(reversed(SENTENCES))  # the same length, another prefix from the start

QUESTIONS = {
    "a": "Can I borrow a film for two weeks?",
    "b": "When is the library open on Saturday?",
    "c": "How much does it cost to print a twenty page report?",
    "d": "My neighbour reserved a book; can you tell me which one?",
    "e": "Where do I find old maps of the harbour?",
    "y": "Is there anything for toddlers this week?",
}


def prompt_of(model, name: str) -> list[int]:
    system = OTHER_SYSTEM if name == "y" else SYSTEM
    return model.tokenizer.encode(f"{system}\n\nQuestion: {QUESTIONS[name]}\nAnswer:")


def params(name: str) -> SamplingParams:
    # half greedy, half sampled with their own seeds
    if name in "bdy":
        return SamplingParams(temperature=0.0)
    return SamplingParams(temperature=0.9, seed=ord(name))


class Counting:
    """The model, counting the tokens fed through it."""

    def __init__(self, model) -> None:
        self.model = model
        self.fed = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_batch(self, batch, all_logits=False):
        self.fed += sum(len(tokens) for tokens, _ in batch)
        return self.model.forward_batch(batch, all_logits)


def engine_for(model, prefix_cache: bool, **config) -> Engine:
    config = SchedulerConfig(prefix_cache=prefix_cache, **config)
    return Engine(Counting(model), config, keep_logits=True)


def submit(engine: Engine, prompt: list[int], name: str):
    return engine.submit(prompt, params(name), TOKENS, stop_ids=frozenset())


def run(engine: Engine, check=None) -> None:
    while engine.has_work():
        engine.step()
        if check is not None:
            check(engine)


def common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def assert_same(seq, ref) -> None:
    tokens, logits = ref
    assert seq.output_ids == tokens
    assert len(seq.logits) == len(logits)
    for a, b in zip(seq.logits, logits, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def model():
    path = bundled_models()[0].path
    if path is None:
        pytest.skip("the bundled model is not installed")
    return mer.load_model(path)


@pytest.fixture(scope="module")
def reference(model) -> dict:
    """Every request run without the prefix cache (all at once: the forward pass is
    batch-invariant): name -> (tokens, logits), and "fed": the tokens fed doing it. "turn2"
    is request "a" followed by its answer and a follow-up question."""
    engine = engine_for(model, prefix_cache=False)
    seqs = {name: submit(engine, prompt_of(model, name), name) for name in QUESTIONS}
    run(engine)
    out = {name: (s.output_ids, s.logits) for name, s in seqs.items()}
    out["fed"] = engine.model.fed
    figures = engine.figures()
    assert figures["prefix_queries_tokens"] == figures["prefix_hits_tokens"] == 0
    assert figures["prefix_held_tokens"] == 0
    turn2 = engine.submit(turn2_prompt(model, out["a"][0]), params("b"), TOKENS, frozenset())
    run(engine)
    out["turn2"] = (turn2.output_ids, turn2.logits)
    return out


def turn2_prompt(model, answer: list[int]) -> list[int]:
    follow_up = model.tokenizer.encode("\nQuestion: And a game?\nAnswer:")
    return prompt_of(model, "a") + answer + follow_up


def test_shared_system_prompt_same_output_far_fewer_tokens_fed(model, reference):
    names = "abcd"
    prompts = {name: prompt_of(model, name) for name in names}
    fed_without = sum(len(p) + TOKENS - 1 for p in prompts.values())  # the last token unfed
    assert reference["fed"] == fed_without + sum(
        len(prompt_of(model, n)) + TOKENS - 1 for n in QUESTIONS if n not in names
    )

    engine = engine_for(model, prefix_cache=True)
    first = submit(engine, prompts["a"], "a")
    while first.prefilling:  # the system prompt goes into the cache once "a" has fed it
        engine.step()
    assert engine.figures()["prefix_held_tokens"] == len(prompts["a"]) // BLOCK_SIZE * BLOCK_SIZE
    rest = {name: submit(engine, prompts[name], name) for name in "bcd"}
    engine.step()  # b, c and d are admitted together, beside a decoding
    assert all(s.status.value == "running" for s in rest.values())
    run(engine)

    hits = {"a": 0}
    for name in "bcd":  # the blocks a's prompt filled that each begins with
        shared = min(common(prompts[name], prompts["a"]), len(prompts[name]) - 1)
        hits[name] = min(shared, len(prompts["a"])) // BLOCK_SIZE * BLOCK_SIZE
        assert hits[name] >= len(model.tokenizer.encode(SYSTEM)) // BLOCK_SIZE * BLOCK_SIZE
    for name, seq in {"a": first, **rest}.items():
        assert_same(seq, reference[name])
        assert seq.cached_tokens == hits[name]
    figures = engine.figures()
    assert figures["prefix_queries_tokens"] == sum(len(p) for p in prompts.values())
    assert figures["prefix_hits_tokens"] == sum(hits.values())
    assert engine.model.fed == fed_without - sum(hits.values())
    # b, c and d each fed a handful of tokens instead of their whole prompt
    for name in "bcd":
        assert len(prompts[name]) - hits[name] < len(prompts[name]) / 10
    assert engine.model.fed < fed_without / 2
    assert figures["running"] == figures["waiting"] == figures["kv_reserved_tokens"] == 0
    assert figures["prefix_held_tokens"] > 0
    assert figures["kv_usage"] == figures["prefix_held_tokens"] / (1 << 16)


def test_the_next_turn_finds_the_previous_answer(model, reference):
    engine = engine_for(model, prefix_cache=True)
    turn1 = submit(engine, prompt_of(model, "a"), "a")
    run(engine)
    assert_same(turn1, reference["a"])
    # every token of turn 1 was fed but the last one sampled: the cache holds their full blocks
    fed = len(turn1.prompt_ids) + TOKENS - 1
    assert engine.figures()["prefix_held_tokens"] == fed // BLOCK_SIZE * BLOCK_SIZE
    assert fed // BLOCK_SIZE > len(turn1.prompt_ids) // BLOCK_SIZE  # blocks of the answer too

    prompt = turn2_prompt(model, turn1.output_ids)
    before = engine.model.fed
    turn2 = engine.submit(prompt, params("b"), TOKENS, frozenset())
    run(engine)
    assert_same(turn2, reference["turn2"])
    hit = fed // BLOCK_SIZE * BLOCK_SIZE
    assert turn2.cached_tokens == hit
    assert engine.model.fed - before == len(prompt) - hit + TOKENS - 1
    figures = engine.figures()
    assert figures["prefix_queries_tokens"] == len(turn1.prompt_ids) + len(prompt)
    assert figures["prefix_hits_tokens"] == hit


def test_eviction_under_a_small_kv_budget(model, reference):
    x1, x2, y, x3 = (prompt_of(model, n) for n in "abye")
    need = {n: len(prompt_of(model, n)) + TOKENS for n in "abye"}
    # beside x2 and y's reservations there is room for 10 blocks: fewer than x2 is seeded from
    budget = need["b"] + need["y"] + 10 * BLOCK_SIZE
    engine = engine_for(model, prefix_cache=True, kv_budget_tokens=budget)
    sched, prefix = engine.scheduler, engine.scheduler.prefix
    seen = {"y waited": False}

    def check(engine) -> None:
        # the budget holds, and blocks that running sequences were seeded from stay
        assert sched.reserved_tokens + prefix.held_tokens <= budget
        assert 0 <= engine.figures()["kv_usage"] <= 1
        for s in sched.running:
            assert all(block in prefix for block in sched.seed_blocks(s))
        if s2.status.value == "running" and s_y.status.value == "waiting":
            # only x2's pinned blocks keep y out: evicting them would have made room
            assert sched.reserved_tokens + need["y"] <= budget
            assert prefix.pinned_tokens > budget - sched.reserved_tokens - need["y"]
            seen["y waited"] = True

    s1 = submit(engine, x1, "a")
    s2 = s_y = s3 = s1
    run(engine, check)
    held = prefix.held_tokens
    assert held == (len(x1) + TOKENS - 1) // BLOCK_SIZE * BLOCK_SIZE
    s2, s_y, s3 = submit(engine, x2, "b"), submit(engine, y, "y"), submit(engine, x3, "e")
    run(engine, check)
    assert seen["y waited"]
    assert s2.cached_tokens >= 16 * BLOCK_SIZE  # the system prompt, from x1
    assert s_y.cached_tokens == 0
    # x3 came in beside y with room for about 10 blocks: the other blocks were evicted, then
    # the ends of those it would have been seeded from
    room = budget - need["y"] - need["e"]
    assert 0 < s3.cached_tokens == room // BLOCK_SIZE * BLOCK_SIZE < s2.cached_tokens
    for seq, name in ((s1, "a"), (s2, "b"), (s_y, "y"), (s3, "e")):
        assert_same(seq, reference[name])
    figures = engine.figures()
    assert figures["prefix_hits_tokens"] == s2.cached_tokens + s3.cached_tokens
    assert figures["prefix_held_tokens"] <= budget


def test_without_the_cache_nothing_is_cached(model):
    engine = engine_for(model, prefix_cache=False)
    assert engine.scheduler.prefix is None
    prompt = prompt_of(model, "b")[: 3 * BLOCK_SIZE]
    first = submit(engine, prompt, "b")
    run(engine)
    second = submit(engine, prompt, "b")
    run(engine)
    assert first.cached_tokens == second.cached_tokens == 0
    assert engine.model.fed == 2 * (len(prompt) + TOKENS - 1)
    assert_same(second, (first.output_ids, first.logits))


def test_a_resumed_generation_reuses_its_own_tokens(model):
    # a resumed generation (resume_ids: tokens it had produced) finds its prompt and those
    # tokens in the cache, and goes on drawing what it would have drawn
    engine = engine_for(model, prefix_cache=True)
    prompt = prompt_of(model, "c")[:40]
    whole = submit(engine, prompt, "c")
    run(engine)
    resumed = engine.submit(
        prompt, params("c"), TOKENS, frozenset(), resume_ids=whole.output_ids[:13]
    )
    before = engine.model.fed
    run(engine)
    assert resumed.output_ids == whole.output_ids
    assert resumed.cached_tokens == len(prompt)
    # 3 blocks of 16 come from the cache, 5 of the 53 tokens are fed, then the rest decodes
    assert engine.model.fed - before == (40 + 13 - 3 * BLOCK_SIZE) + (TOKENS - 13 - 1)
    for a, b in zip(resumed.logits, whole.logits[13:], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny random Mixtral (2 layers x 8 experts, top-2, a sliding window of 64) saved as
    float32 safetensors."""
    from tests.support.hf_models import build_model, save_model
    from tests.support.tokenizers import write_tokenizer

    path = tmp_path_factory.mktemp("prefix-moe") / "hf-mixtral"
    save_model(build_model("mixtral-mqa-window", n_layers=2, seed=3), path, "f32")
    write_tokenizer(path, "chatml")
    return path


def test_streamed_experts_and_a_sliding_window(moe):
    # experts streamed from disk through a cache of 4 of the 16; a shared prefix longer than
    # the attention window
    with mer.load_model(moe, cache_bytes=1 << 30, io_backend="preadv") as probe:
        slot = probe.streamer.telemetry()["slot_bytes"]
    with mer.load_model(moe, cache_bytes=4 * slot, io_backend="preadv") as model:
        assert model.args.sliding_window == 64
        rng = np.random.default_rng(7)
        shared = rng.integers(3, model.args.vocab_size, size=150).tolist()
        own = {"a": 9, "b": 20, "c": 3}  # tokens after the shared ones
        prompts = {n: shared + rng.integers(3, 512, size=k).tolist() for n, k in own.items()}

        def serve(prefix_cache: bool) -> tuple[dict, Engine, int]:
            engine = engine_for(model, prefix_cache)
            routed = model.streamer.telemetry()["tokens"]
            first = submit(engine, prompts["a"], "a")
            while first.prefilling:
                engine.step()
            seqs = {"a": first, **{n: submit(engine, prompts[n], n) for n in "bc"}}
            run(engine)
            return seqs, engine, model.streamer.telemetry()["tokens"] - routed

        without, plain, routed_without = serve(False)
        with_cache, engine, routed = serve(True)
        hit = 150 // BLOCK_SIZE * BLOCK_SIZE
        for name in "abc":
            assert_same(with_cache[name], (without[name].output_ids, without[name].logits))
            assert with_cache[name].cached_tokens == (0 if name == "a" else hit)
        assert plain.model.fed - engine.model.fed == 2 * hit
        # the tokens routed through the streamed experts: the cached ones were not
        assert routed_without == plain.model.fed and routed == engine.model.fed


def test_latent_attention_caches_one_row_per_position(tmp_path):
    """DeepSeek-V3's KV cache holds one latent row per position (the values are views of
    it): prefix blocks keep those rows alone and seed them back bit-exactly."""
    from tests.support.hf_models import build_model, save_model

    path = save_model(build_model("deepseek3-base", n_layers=2, seed=3), tmp_path / "ds", "f32")
    model = mer.load_model(path)
    a = model.args
    assert KVCache(a).k[0].shape[1:] == (1, a.kv_lora_rank + a.head_dim)
    rng = np.random.default_rng(4)
    shared = rng.integers(3, a.vocab_size, size=70).tolist()
    prompts = {n: shared + rng.integers(3, 500, size=k).tolist() for n, k in (("a", 5), ("b", 9))}

    def serve(prefix_cache: bool) -> tuple[dict, Engine]:
        engine = engine_for(model, prefix_cache)
        first = submit(engine, prompts["a"], "a")
        while first.prefilling:
            engine.step()
        seqs = {"a": first, "b": submit(engine, prompts["b"], "b")}
        run(engine)
        return seqs, engine

    without, _ = serve(False)
    with_cache, engine = serve(True)
    for name in "ab":
        assert_same(with_cache[name], (without[name].output_ids, without[name].logits))
    assert with_cache["b"].cached_tokens == 70 // BLOCK_SIZE * BLOCK_SIZE
    blocks = list(engine.scheduler.prefix._blocks.values())
    assert blocks and all(b.v is None for b in blocks)


# the block index alone, on a KV cache filled with made-up keys and values


def filled(args, n: int, seed: int) -> KVCache:
    cache = KVCache(args)
    cache.reserve(n)
    rng = np.random.default_rng(seed)
    for layer in cache.k + cache.v:
        layer[:n] = rng.standard_normal(layer[:n].shape, dtype=np.float32)
    cache.length = n
    return cache


def test_blocks_chain_match_short_of_the_last_token_and_seed(model):
    args, bs = model.args, BLOCK_SIZE
    prefix = PrefixCache()
    tokens = list(range(100, 100 + 3 * bs + 5))
    cache = filled(args, len(tokens), 1)
    assert prefix.insert(tokens, cache, limit=1 << 20) == 3  # full blocks only
    assert prefix.held_blocks == 3 and prefix.held_tokens == 3 * bs

    assert len(prefix.match(tokens)) == 3
    assert len(prefix.match(tokens[: 3 * bs])) == 2  # the last token is left to feed
    assert len(prefix.match(tokens[: 3 * bs + 1])) == 3
    assert prefix.match(tokens[1:]) == []  # the same tokens at other positions do not match
    other = [7] + tokens[1:]
    assert prefix.match(other) == []  # a block's key is its whole prefix
    assert block_key(None, tokens[bs : 2 * bs]) != prefix.match(tokens)[1].key

    seeded = KVCache(args)
    assert prefix.seed(prefix.match(tokens), seeded) == 3 * bs
    assert seeded.length == 3 * bs
    for a, b in zip(seeded.k + seeded.v, cache.k + cache.v, strict=True):
        np.testing.assert_array_equal(a[: 3 * bs], b[: 3 * bs])


def test_lru_eviction_takes_the_ends_of_chains_and_never_pinned_blocks(model):
    args, bs = model.args, BLOCK_SIZE
    prefix = PrefixCache()
    shared = list(range(1, 2 * bs + 1))
    a = shared + list(range(500, 500 + 2 * bs))
    b = shared + list(range(900, 900 + bs))
    prefix.insert(a, filled(args, len(a), 2), limit=1 << 20)
    prefix.insert(b, filled(args, len(b), 3), limit=1 << 20)
    assert prefix.held_blocks == 5  # 2 shared, 2 of a's own, 1 of b's own
    chain_b = prefix.match(b + [0])
    prefix.acquire(chain_b, len(b))  # a sequence was seeded from b's blocks
    assert (prefix.queries_tokens, prefix.hits_tokens) == (len(b), 3 * bs)
    assert prefix.pinned_tokens == 3 * bs

    # a's own blocks go, last first; b's chain is pinned
    assert prefix.evict(10 * bs) == 2 * bs
    assert prefix.held_blocks == 3 and all(block in prefix for block in chain_b)
    assert len(prefix.match(a)) == 2
    prefix.release(chain_b)
    assert prefix.pinned_tokens == 0
    assert prefix.evict(bs, keep=chain_b[:2]) == bs  # b's last block; the shared ones kept
    assert prefix.held_blocks == 2

    # insertion keeps within its limit, evicting least recently used blocks for room
    c = list(range(2000, 2000 + 3 * bs))
    assert prefix.insert(c, filled(args, len(c), 4), limit=3 * bs) == 3
    assert prefix.held_blocks == 3 and prefix.match(shared + [0]) == []
    # each of a's blocks takes the place of one of c's, last first; a's fourth finds none
    assert prefix.insert(a, filled(args, len(a), 2), limit=3 * bs) == 3
    assert prefix.held_blocks == 3 and prefix.match(c) == [] and len(prefix.match(a)) == 3
    # nothing evictable: what does not fit is not kept
    prefix.acquire(prefix.match(a + [0]), len(a))
    assert prefix.insert(c, filled(args, len(c), 4), limit=3 * bs) == 0
    assert prefix.held_blocks == 3
