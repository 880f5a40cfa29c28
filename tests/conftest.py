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


@pytest.fixture(scope="session")
def gguf_moe(tmp_path_factory, request):
    """Tiny trained Qwen3-MoE and OLMoE models made into GGUF files by llama.cpp's converter
    and quantizer, built on first use: `gguf_moe(arch)` -> (transformers model holding the
    F16-rounded weights, {kind: gguf path})."""
    from tests.support import moe_gguf

    built: dict[str, tuple] = {}
    cache = getattr(request.config, "cache", None)

    def get(arch: str):
        if arch not in built:
            root = tmp_path_factory.mktemp(f"gguf-{arch}")
            src = Path(cache.mkdir("llama-cpp-src")) if cache else root / "llama-cpp-src"
            built[arch] = moe_gguf.build(arch, root, src)
        return built[arch]

    return get
