"""GGUF files that parse but are wrong, and GGUF contexts below mer's KV-cache block: the real
`mer` command on files llama.cpp made, edited."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

import mer
from mer.sampling import SamplingParams
from tests.support import gguf_files
from tests.support.cli import assert_one_line_error, run_mer


@pytest.fixture(scope="module")
def paths(gguf_mixtral) -> dict[str, Path]:
    return gguf_mixtral[1]


def _arch(path: Path) -> str:
    return gguf.GGUFReader(path).fields["general.architecture"].contents()


def test_context_of_64_end_to_end(paths, tmp_path):
    src = paths["q8_0"]
    small = gguf_files.rewrite(src, tmp_path / "ctx64.gguf", {f"{_arch(src)}.context_length": 64})
    model = mer.load_model(small)
    assert model.args.max_seq_len == 64
    prompt = model.tokenizer.encode("the quick brown fox")
    generation = model.generate(prompt, SamplingParams(temperature=0.0), 500, stop_ids=frozenset())
    tokens = list(generation)
    assert generation.finish_reason == "context" and len(prompt) + len(tokens) == 64
    # The same tokens as the unedited file gives, while both have room.
    full = mer.load_model(src)
    assert tokens == list(
        full.generate(prompt, SamplingParams(temperature=0.0), len(tokens), stop_ids=frozenset())
    )
    proc = run_mer(
        "generate",
        "--model",
        str(small),
        "--prompt",
        "the quick brown fox",
        "--max-tokens",
        "500",
        "--temperature",
        "0",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["finish_reason"] in ("context", "stop")
    assert (
        run_mer(
            "generate",
            "--model",
            str(src),
            "--prompt",
            "hi",
            "--max-seq-len",
            "64",
            "--max-tokens",
            "8",
        ).returncode
        == 0
    )


def test_nan_weights(paths, tmp_path):
    def poison(name, data, qtype):
        if name == "blk.1.ffn_down_exps.weight":
            data = np.full_like(data, np.nan)
        yield name, data, qtype

    bad = gguf_files.rewrite(paths["f16"], tmp_path / "nan.gguf", tensors=poison)
    proc = run_mer(
        "generate", "--model", str(bad), "--prompt", "the quick brown fox", "--max-tokens", "4"
    )
    assert_one_line_error(proc, "layer 1", "non-finite", str(bad), "corrupt")


def test_tensor_type_that_does_not_match_its_size(paths, tmp_path):
    bad = gguf_files.retype(
        paths["q4_0"],
        tmp_path / "retyped.gguf",
        "blk.0.attn_q.weight",
        gguf.GGMLQuantizationType.Q8_0,
    )
    proc = run_mer("generate", "--model", str(bad), "--prompt", "hi", "--max-tokens", "2")
    assert_one_line_error(proc, str(bad), "blk.0.attn_q.weight", "does not match its size")


@pytest.mark.parametrize("key", ["bos", "eos", "eot", "unknown"])
def test_special_token_id_out_of_range(paths, tmp_path, key):
    src = paths["q8_0"]
    n_tokens = len(gguf.GGUFReader(src).fields["tokenizer.ggml.tokens"].contents())
    meta = {f"tokenizer.ggml.{key}_token_id": n_tokens + 7}
    bad = gguf_files.rewrite(src, tmp_path / f"{key}.gguf", meta)
    proc = run_mer("generate", "--model", str(bad), "--prompt", "hi", "--max-tokens", "2")
    assert_one_line_error(proc, str(bad), f"{key}_token_id", "not a token id")
