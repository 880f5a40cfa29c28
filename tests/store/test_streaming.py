"""Experts streamed through a RAM cache of 25% of the expert bytes give exactly the logits
and greedy tokens of a model with every expert resident: through io_uring and the preadv
fallback, from a store, straight from GGUF and from safetensors. A corrupt expert on disk is
an error after one retry, never different output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mer
from mer.errors import MerError
from mer.io.reader import ExpertReadError
from mer.models.sources import resolve_model
from mer.sampling import SamplingParams

IDS = list(range(3, 70))
GREEDY = SamplingParams(temperature=0)


def expert_bytes(model) -> int:
    return sum(
        w.gguf_nbytes
        for layer in model.weights.layers
        for x in layer.experts
        for w in (x.gate, x.up, x.down)
    )


def check_same(resident, path, budget, **kwargs) -> dict:
    """Prefill logits, token-by-token logits and greedy tokens equal; returns telemetry."""
    with mer.load_model(path, cache_bytes=budget, **kwargs) as streamed:
        assert streamed.streamer.cache.n_slots < sum(
            len(layer.experts) for layer in resident.weights.layers
        )
        np.testing.assert_array_equal(streamed.logits(IDS), resident.logits(IDS))
        np.testing.assert_array_equal(
            streamed.logits(IDS[:20], chunk_size=1), resident.logits(IDS[:20], chunk_size=1)
        )
        prompt = IDS[:9]
        assert list(streamed.generate(prompt, GREEDY, 24, stop_ids=frozenset())) == list(
            resident.generate(prompt, GREEDY, 24, stop_ids=frozenset())
        )
        return streamed.expert_stats()


@pytest.mark.parametrize("backend", ["uring", "preadv"])
def test_store_at_quarter_budget(q4_store, backend, o_direct):
    resident = mer.load_model(q4_store)
    stats = check_same(resident, q4_store, expert_bytes(resident) // 4, io_backend=backend)
    assert stats["backend"] == backend
    assert stats["misses"] > 0 and stats["hits"] > 0
    assert stats["bytes_read"] >= stats["misses"] * 4096
    assert 0 < stats["cold_read_ms_p50"] <= stats["cold_read_ms_p99"]
    per_layer = stats["per_layer"]
    assert sum(v["hits"] for v in per_layer.values()) == stats["hits"]
    assert sum(v["misses"] for v in per_layer.values()) == stats["misses"]
    for name in ("prefetch_precision", "prefetch_recall", "gate_precision", "gate_recall"):
        assert 0.0 <= stats[name] <= 1.0


@pytest.mark.parametrize("kind", ["q4_k_m", "q8_0"])
def test_gguf_at_quarter_budget(gguf_mixtral, kind):
    """Straight from llama.cpp-made GGUF files (4 experts x 2 layers, top-2). Each matrix is
    read as an aligned superset of its bytes, so a quarter of the bytes is a single slot."""
    path = gguf_mixtral[1][kind]
    resident = mer.load_model(path)
    stats = check_same(resident, path, expert_bytes(resident) // 4)
    assert stats["slots"] == 1
    assert stats["gate_recall"] > 0


def test_gguf_store_at_quarter_budget(gguf_mixtral, tmp_path):
    from mer.store.convert import convert

    path = gguf_mixtral[1]["q4_k_m"]
    convert(path, tmp_path / "s")
    resident = mer.load_model(path)
    check_same(resident, tmp_path / "s", expert_bytes(resident) // 4)


def test_safetensors_at_quarter_budget(hf_mixtral):
    resident = mer.load_model(hf_mixtral)
    check_same(resident, hf_mixtral, expert_bytes(resident) // 4)


@pytest.mark.parametrize(
    "name",
    [
        "qwen3moe-top4-softmax",
        "olmoe-gqa-top3-norm",
        "deepseek3-base",
        "deepseek2-lite",
        "qwen2moe-base",
        "gptoss-yarn-clamp",
    ],
)
def test_newer_moe_architectures_at_quarter_budget(name, store_dir):
    """Qwen3-MoE and OLMoE (per-head and whole-projection q/k norms, routing weights
    renormalised or not), DeepSeek-V3 and -V2 (latent attention, a dense first layer and
    shared experts resident, the routed experts streamed), Qwen2-MoE (projection biases, a
    gated shared expert), gpt-oss (experts stored transposed with gate and up interleaved, their
    biases resident), from safetensors and from a Q4_0
    store; a float32 store computes exactly what the safetensors do."""
    from mer.store.convert import convert
    from tests.support.hf_models import build_model, save_model

    path = store_dir / f"hf-{name}"
    save_model(build_model(name, n_layers=3, seed=5), path, "f32")
    resident = mer.load_model(path)
    check_same(resident, path, expert_bytes(resident) // 4)
    convert(path, store_dir / f"store32-{name}")
    np.testing.assert_array_equal(
        mer.load_model(store_dir / f"store32-{name}").logits(IDS), resident.logits(IDS)
    )
    convert(path, store_dir / f"store-{name}", quant="q4_0")
    resident = mer.load_model(store_dir / f"store-{name}")
    check_same(resident, store_dir / f"store-{name}", expert_bytes(resident) // 4)


def test_dense_llama_streams_its_ffns():
    """SmolLM2 (30 dense layers): each FFN streamed, the next one read ahead."""
    path = resolve_model(None)
    resident = mer.load_model(path)
    ids = resident.tokenizer.encode("The capital of France is")
    budget = expert_bytes(resident) // 4
    with mer.load_model(path, cache_bytes=budget) as streamed:
        assert list(streamed.generate(ids, GREEDY, 8)) == list(resident.generate(ids, GREEDY, 8))
        stats = streamed.expert_stats()
    assert stats["prefetches"] > 0 and stats["prefetch_precision"] > 0.9


def test_no_prefetch_same_output(q4_store):
    resident = mer.load_model(q4_store)
    stats = check_same(resident, q4_store, expert_bytes(resident) // 4, prefetch=False)
    assert stats["prefetches"] == 0


def test_one_slot_cache(q4_store):
    """Smaller than a layer's experts: computed experts make room for the rest."""
    resident = mer.load_model(q4_store)
    with mer.load_model(q4_store, cache_bytes=json_slot(q4_store)) as streamed:
        assert streamed.streamer.cache.n_slots == 1
        np.testing.assert_array_equal(streamed.logits(IDS), resident.logits(IDS))


def json_slot(store) -> int:
    entries = json.loads((store / "manifest.json").read_text())["experts"]["entries"]
    return -(-max(e["length"] for e in entries) // 4096) * 4096


def test_budget_below_one_expert(q4_store):
    with pytest.raises(MerError, match="holds no expert") as info:
        mer.load_model(q4_store, cache_bytes=4096)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", ["uring", "preadv"])
def test_flipped_byte_is_an_error_after_a_retry(q4_store, o_direct, backend):
    bad = o_direct / f"flipped-{backend}"
    shutil.copytree(q4_store, bad)
    entries = json.loads((bad / "manifest.json").read_text())["experts"]["entries"]
    with open(bad / "experts.bin", "r+b") as fh:
        for entry in entries:  # every expert: whichever is routed first fails
            fh.seek(entry["offset"] + entry["length"] // 2)
            byte = fh.read(1)
            fh.seek(entry["offset"] + entry["length"] // 2)
            fh.write(bytes([byte[0] ^ 0x01]))
    with mer.load_model(bad, cache_bytes=json_slot(bad) * 4, io_backend=backend) as model:
        with pytest.raises(ExpertReadError) as info:
            model.logits(IDS)
        text = str(info.value)
        assert "checksum mismatch" in text and "after 2 attempts" in text and "\n" not in text
        assert model.streamer.readers[0].stats.retries >= 1
        # the cache holds no corrupt expert: the next request fails the same way
        with pytest.raises(ExpertReadError):
            model.logits(IDS[:3])


def test_no_verify_reads_unchecked(q4_store):
    """verify=False skips checksums (the bytes are the same, so is the output)."""
    resident = mer.load_model(q4_store)
    check_same(resident, q4_store, expert_bytes(resident) // 4, verify=False)


def test_read_ahead_pays_for_itself(q4_store):
    """A read-ahead needs p > 1 - W / t (W: the disk's idle window, a layer's CPU time; t: the
    read's time) and p > 1/2; each admitted read uses up part of the window."""
    from mer.cache.readahead import Candidate

    with mer.load_model(q4_store, cache_bytes=json_slot(q4_store) * 6) as model:
        s = model.streamer
        nbytes = s.lookahead.candidate((1, 0), 1.0).nbytes
        s.tier.stats.bytes_read, s.tier.stats.read_busy_s = nbytes, 1.0  # t = 1 s per expert
        s._cpu_s = 0.1  # reads dominate: only p > 0.9 passes
        s._prefetch([Candidate((1, 0), 0.85, nbytes), Candidate((1, 1), 0.95, nbytes)])
        assert s.tier.stats.prefetch_reads == 1 and s.cache.slot_of((1, 1)) is not None
        assert s.cache.slot_of((1, 0)) is None
        s._harvest(block=True)
        s._cpu_s = 1.5  # the disk idles for 1.5 reads: p > 1/2 passes, then p > 0.5 + ...
        s._prefetch([Candidate((1, k), p, nbytes) for k, p in ((2, 0.45), (3, 0.6), (4, 0.7))])
        assert s.tier.stats.prefetch_reads == 3
        assert s.cache.slot_of((1, 4)) is not None and s.cache.slot_of((1, 3)) is not None
        assert s.cache.slot_of((1, 2)) is None
        seen = []
        s.run(1, [1, 3, 4], lambda e, w, slot: seen.append(e))
        assert sorted(seen) == [1, 3, 4]
        assert s.cache.stats.prefetch_used == 3 and s.cache.stats.misses == 0


def test_streamed_store_compiles_nothing_after_warm_up(q4_store):
    from tests.support.compiled import no_compilation_after_warm_up

    with mer.load_model(q4_store, cache_bytes=300 << 10) as model:
        no_compilation_after_warm_up(model)


def test_stats_table_and_json(q4_store):
    from tests.support.cli import run_mer

    args = ["generate", "--model", str(q4_store), "--cache-bytes", "300K", "--prompt", "hello"]
    args += ["--max-tokens", "12", "--temperature", "0", "--stats"]
    table = run_mer(*args)
    assert table.returncode == 0, table.stderr
    for needle in ("acquires", "ready", "in flight", "missed", "layer 0", "layer 1", "per token"):
        assert needle in table.stderr
    out = json.loads(run_mer(*args, "--json").stdout)
    st = out["stats"]
    assert st["hits"] + st["inflight_hits"] + st["misses"] == st["acquires"] > 0
    assert st["hit_rate"] == st["hits"] / st["acquires"]
    assert st["inflight_hit_rate"] == st["inflight_hits"] / st["acquires"]
    assert st["bytes_per_token"] == st["bytes_read"] / st["tokens"]
    # one prefill, then one pass per generated token but the last
    assert st["steps"] == len(out["token_ids"])
    assert st["tokens"] == len(out["prompt_ids"]) + len(out["token_ids"]) - 1
    per_layer = st["per_layer"]
    assert sum(v["misses"] for v in per_layer.values()) == st["misses"]


def test_trace_ordered_layout_merges_reads(store_dir, tmp_path):
    """`mer convert --trace`: a routing trace recorded on the model lays each layer's experts
    out by co-use. Streamed at a quarter of the experts, the output is bit-identical with
    reads merged or not; merged, the disk sees fewer requests than experts were read."""
    from mer.cache.trace import RoutingTrace
    from mer.store.convert import convert
    from tests.support.hf_models import build_model, save_model

    hf = save_model(build_model("qwen3moe-top4-softmax", seed=4), store_dir / "hf-qwen3", "f32")
    model = mer.load_model(hf)
    trace = RoutingTrace(model.args.n_layers, model.args.n_experts)
    model.transformer.routing_observer = trace.observe
    list(model.generate(IDS[:20], GREEDY, 40, stop_ids=frozenset()))
    trace.save(tmp_path / "trace.json")
    store = store_dir / "store-qwen3-traced"
    manifest = convert(hf, store, quant="q4_0", trace=tmp_path / "trace.json")
    assert manifest["layout"] == "co-use"
    by_offset = [
        [e["expert"] for e in sorted(manifest["experts"]["entries"], key=lambda e: e["offset"])
         if e["layer"] == layer]
        for layer in range(2)
    ]  # fmt: skip
    assert by_offset != [list(range(16))] * 2  # not id order
    resident = mer.load_model(store)
    stats = {
        coalesce: check_same(resident, store, expert_bytes(resident) // 4, coalesce=coalesce)
        for coalesce in (True, False)
    }
    assert stats[False]["reads_merged"] == 0
    assert stats[True]["reads_merged"] > 0
    read = stats[True]["misses"] + stats[True]["prefetches"]
    assert stats[True]["disk_reads"] < read
    with pytest.raises(MerError, match="trace of 2 layers x 16 experts"):
        convert(hf_dir_of(store_dir), store_dir / "wrong", trace=tmp_path / "trace.json")


def hf_dir_of(store_dir):
    """A Hugging Face model of another shape than the trace's."""
    from tests.support.hf_models import build_model, save_model

    return save_model(build_model("olmoe-base", seed=1), store_dir / "hf-olmoe", "f32")
