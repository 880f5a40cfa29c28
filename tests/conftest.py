"""Session-wide fixtures: model files that several test modules share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def gguf_mixtral(tmp_path_factory, request) -> tuple[object, dict[str, Path]]:
    """A tiny trained Mixtral made into GGUF files by llama.cpp's converter and quantizer:
    (transformers model holding the F16-rounded weights, {kind: gguf path})."""
    from tests.support import mixtral_gguf

    root = tmp_path_factory.mktemp("gguf-mixtral")
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    src = Path(cache.mkdir("llama-cpp-src")) if cache else root / "llama-cpp-src"
    return mixtral_gguf.build(root, src)
