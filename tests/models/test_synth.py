"""`mer synth`: a synthetic MoE model that llama.cpp loads, mer runs identically from the GGUF
and from its store, whose routing knobs do what the documentation says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mer
from mer.models.sources import resolve_model
from mer.sampling import SamplingParams
from mer.synth import SHAPES, Knobs, measure_routing, synth_size, write_gguf
from tests.support.cli import assert_one_line_error, run_mer

TEXT = "The river ran quietly past the old mill, and the children watched the water turn"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny synthetic model written by the real command: (GGUF file, its store)."""
    root = tmp_path_factory.mktemp("synth")
    gguf_path, store = root / "tiny.gguf", root / "tiny-store"
    proc = run_mer("synth", str(gguf_path), "--shape", "tiny", "--store", str(store))
    assert proc.returncode == 0, proc.stderr
    assert "repeat" in proc.stdout and "layer" in proc.stdout  # the routing histogram
    return gguf_path, store


def test_llamacpp_loads_it_and_mer_runs_it_the_same_from_the_store(made):
    import llama_cpp

    gguf_path, store = made
    from_gguf, from_store = mer.load_model(gguf_path), mer.load_model(store)
    ids = from_gguf.tokenizer.encode(TEXT)
    np.testing.assert_array_equal(from_gguf.logits(ids), from_store.logits(ids))
    greedy = SamplingParams(temperature=0.0)
    tokens = list(from_gguf.generate(ids, greedy, 16, stop_ids=frozenset()))
    assert tokens == list(from_store.generate(ids, greedy, 16, stop_ids=frozenset()))
    with mer.load_model(store, cache_bytes=700 << 10) as streamed:  # and streamed, 3 slots
        assert tokens == list(streamed.generate(ids, greedy, 16, stop_ids=frozenset()))

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, logits_all=True, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    ours = from_gguf.logits(ids)
    assert np.isfinite(theirs).all()
    # Same weights, two engines (llama.cpp rounds activations to 8 bits): close, not equal.
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_other_block_types_load_in_both_engines(tmp_path, quant):
    import llama_cpp

    path = tmp_path / f"{quant}.gguf"
    write_gguf(path, SHAPES["tiny"], quant, Knobs(), resolve_model(None))
    model = mer.load_model(path)
    ids = model.tokenizer.encode(TEXT)
    assert np.isfinite(model.logits(ids)).all()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    assert np.isfinite(np.array(llm.scores[: len(ids)])).all()


def test_deepseek_shape(tmp_path):
    """A DeepSeek-shaped model (llama.cpp's deepseek2: latent attention with compressed
    queries, a dense first layer, a shared expert): llama.cpp loads it and computes what mer
    computes; mer gives the same logits from its store, streamed."""
    import llama_cpp

    from mer.store.convert import convert

    path = tmp_path / "ds.gguf"
    shape = SHAPES["tiny-deepseek"]
    assert write_gguf(path, shape, "q8_0", Knobs(), resolve_model(None)) == synth_size(
        shape, "q8_0", resolve_model(None)
    )
    model = mer.load_model(path)
    a = model.args
    assert (a.arch, a.kv_lora_rank, a.q_lora_rank, a.first_dense_layers) == (
        "deepseek2",
        128,
        96,
        1,
    )
    assert a.shared_ffn_dim == shape.ffn and a.n_experts == shape.experts
    ids = model.tokenizer.encode(TEXT)
    ours = model.logits(ids)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    assert np.isfinite(ours).all() and 0.1 < ours.std() < 100
    assert np.corrcoef(theirs.ravel(), ours.ravel())[0, 1] > 0.99
    convert(path, tmp_path / "store")
    with mer.load_model(tmp_path / "store", cache_bytes=1 << 20) as streamed:
        np.testing.assert_array_equal(streamed.logits(ids), ours)
    table = measure_routing(model, 64).table().splitlines()
    assert table[1].split() == ["0", "dense"] and len(table[2].split()) == shape.experts + 2


def test_size_is_known_before_writing(tmp_path):
    path = tmp_path / "m.gguf"
    written = write_gguf(path, SHAPES["tiny"], "q4_0", Knobs(), resolve_model(None))
    assert written == synth_size(SHAPES["tiny"], "q4_0", resolve_model(None))
    assert 0 < path.stat().st_size - written < 4 << 20  # header and vocabulary


@pytest.fixture(scope="module")
def routing(tmp_path_factory):
    """routing(skew, stickiness): RoutingStats of a small model over 384 tokens of text."""
    root, made = tmp_path_factory.mktemp("routing"), {}

    def measure(skew: float, stickiness: float):
        if (skew, stickiness) not in made:
            path = root / f"m-{skew}-{stickiness}.gguf"
            write_gguf(path, SHAPES["small"], "q8_0", Knobs(skew, stickiness), resolve_model(None))
            made[skew, stickiness] = measure_routing(mer.load_model(path), 384)
        return made[skew, stickiness]

    return measure


def test_skew_makes_some_experts_popular(routing):
    flat = routing(0.0, 0.0).shares()
    skewed = routing(2.0, 0.0).shares()
    k_over_e = 2 / 8
    assert abs(flat.mean() - k_over_e) < 1e-9 and abs(skewed.mean() - k_over_e) < 1e-9
    # the most popular expert's share per layer, averaged: near 1/4 when flat
    assert flat.max(1).mean() < 0.4 < 0.5 < skewed.max(1).mean()


def test_stickiness_makes_neighbours_route_alike(routing):
    loose = routing(0.0, 0.0).repeat_rate()
    sticky = routing(0.0, 0.9).repeat_rate()
    assert loose < 0.2  # about 1/8, the chance of a random first choice repeating
    assert sticky > loose + 0.08


def test_activations_stay_bounded_through_32_layers(tmp_path):
    path = tmp_path / "deep.gguf"
    shape = SHAPES["tiny"].__class__(layers=32, experts=4, dim=256, ffn=512, heads=4, kv_heads=2)
    write_gguf(path, shape, "q8_0", Knobs(stickiness=0.9, skew=2.0), resolve_model(None))
    model = mer.load_model(path)
    logits = model.logits(model.tokenizer.encode(TEXT))
    assert np.isfinite(logits).all() and 0.1 < logits.std() < 100


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--stickiness", "1"], "--stickiness"),
        (["--skew", "-1"], "--skew"),
        (["--top-k", "9"], "--top-k"),
        (["--heads", "3"], "--dim"),
        (["--quant", "q2"], "--quant"),
        (["--layers", "0"], "--layers"),
    ],
)
def test_bad_flags(tmp_path, args, needle):
    proc = run_mer("synth", str(tmp_path / "x.gguf"), "--shape", "tiny", *args)
    assert_one_line_error(proc, needle, code=2)
    assert not (tmp_path / "x.gguf").exists()


def test_refuses_to_overwrite(made, tmp_path):
    gguf_path, _ = made
    before = gguf_path.stat().st_mtime_ns
    assert_one_line_error(run_mer("synth", str(gguf_path), "--shape", "tiny"), "--force")
    assert gguf_path.stat().st_mtime_ns == before
    meta = run_mer(
        "generate", "--model", str(gguf_path), "--prompt", "hi", "--max-tokens", "3", "--json"
    )
    assert json.loads(meta.stdout)["finish_reason"] in ("length", "stop")
