"""Opening only part of a model: its tokenizer (the api needs no weights)."""

from __future__ import annotations

from pathlib import Path

from mer.errors import ModelFormatError
from mer.tokenizer import Tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a mer store, a Hugging Face directory or a GGUF file."""
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ModelFormatError(f"{path}: no tokenizer.json")
        return Tokenizer.from_hf_dir(path)
    from mer.io.gguf import GGUFFile
    from mer.models.gguf import gguf_tokenizer

    if not path.exists():
        raise ModelFormatError(f"{path}: no such model file or directory")
    gg = GGUFFile(path)
    tokenizer = gguf_tokenizer(gg)
    gg.drop_metadata()
    return tokenizer
