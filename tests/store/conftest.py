"""Models for the store and streaming tests, on a disk that takes O_DIRECT when there is one
(so io_uring and preadv really read with O_DIRECT)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.io.conftest import o_direct_dir, takes_o_direct
from tests.support.hf_models import build_model, save_model
from tests.support.tokenizers import write_tokenizer


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory) -> Iterator[Path]:
    """A directory on a real disk, or the temporary directory when none takes O_DIRECT."""
    base = tmp_path_factory.mktemp("store")
    with o_direct_dir(base) as found:
        yield found or base


@pytest.fixture
def o_direct(store_dir) -> Path:
    """store_dir, for tests that name an O_DIRECT backend; skips where no disk takes it."""
    if not takes_o_direct(store_dir):
        pytest.skip(f"no directory that takes O_DIRECT (tried {store_dir})")
    return store_dir


@pytest.fixture(scope="session")
def hf_mixtral(store_dir) -> Path:
    """A tiny random Mixtral (2 layers x 8 experts, top-2) saved as float32 safetensors."""
    path = store_dir / "hf-mixtral"
    model = build_model("mixtral-mqa-window", n_layers=2, seed=3)
    save_model(model, path, "f32")
    write_tokenizer(path, "chatml")
    return path


@pytest.fixture(scope="session")
def q4_store(hf_mixtral, store_dir) -> Path:
    """hf_mixtral converted to a store with Q4_0 experts."""
    from mer.store.convert import convert

    path = store_dir / "store-q4_0"
    convert(hf_mixtral, path, quant="q4_0")
    return path
