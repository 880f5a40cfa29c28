"""The first run of a fresh install compiles the kernels: it says so on a terminal, and the
compilation happens before generation starts, outside the timings."""

from __future__ import annotations

import os
import pty
import subprocess

import pytest

import mer
from tests.support.cli import MER
from tests.support.compiled import no_compilation_after_warm_up
from tests.support.hf_models import build_model, save_model
from tests.support.tokenizers import write_tokenizer

NOTICE = "compiling kernels (first run only)"


@pytest.mark.parametrize("kind", ["q4_k_m", "q8_0"])
def test_gguf_compiles_nothing_after_warm_up(gguf_mixtral, kind):
    no_compilation_after_warm_up(mer.load_model(gguf_mixtral[1][kind]))


def test_bundled_model_compiles_nothing_after_warm_up():
    from mer.models.sources import bundled_models

    path = bundled_models()[0].path
    if path is None:
        pytest.skip("the bundled model is not installed")
    no_compilation_after_warm_up(mer.load_model(path))


def test_first_run_says_it_compiles(tmp_path):
    model = tmp_path / "model"
    save_model(build_model("llama-tied-headdim"), model, "f32")
    write_tokenizer(model, "chatml")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "fresh-cache")}
    args = [*MER, "generate", "--model", str(model), "--prompt", "hi", "--max-tokens", "3"]

    def on_a_terminal() -> str:
        main, sub = pty.openpty()
        try:
            proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=sub, env=env, timeout=600)
            os.close(sub)
            sub = -1
            chunks = []
            while True:
                try:
                    chunk = os.read(main, 4096)
                except OSError:  # the terminal's other end is closed: all read
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(main)
            if sub >= 0:
                os.close(sub)
        assert proc.returncode == 0, b"".join(chunks)
        return b"".join(chunks).decode()

    first = on_a_terminal()
    assert NOTICE in first
    assert NOTICE not in on_a_terminal()  # the kernels are in the cache now
