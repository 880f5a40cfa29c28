"""mer: run Mixture-of-Experts language models on a CPU, streaming experts from SSD."""

from typing import Any

from mer.errors import MerError, ModelFormatError

__all__ = ["MerError", "Model", "ModelFormatError", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Loaded on first use, so importing one kernel does not compile the whole engine.
    if name in ("Model", "load_model"):
        from mer import model

        return getattr(model, name)
    raise AttributeError(f"module 'mer' has no attribute {name!r}")
