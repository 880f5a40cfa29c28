"""Build tiny Hugging Face tokenizer directories offline, for tests.

`write_tokenizer(directory, style)` trains a small BPE on the built-in corpus below and writes the
files `transformers.AutoTokenizer.from_pretrained(directory)` needs. Two styles:

- "chatml": byte-level BPE with `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` and a ChatML chat
  template with a default system message, laid out like SmolLM2-Instruct (no BOS added on encode).
- "llama": SentencePiece-like BPE (Metaspace pre-tokenizer, byte fallback tokens `<0x00>`..`<0xFF>`,
  `<unk>`, `<s>`, `</s>`), a post-processor adding `<s>`, and a Mixtral `[INST]` chat template.

Both stay under 500 tokens so they fit models with `vocab_size` 512. Output is deterministic.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = """\
The river ran quietly past the old mill, and the miller's children watched the water turn the
great wooden wheel. Every morning they counted the boats: three, four, sometimes twelve. Their
mother baked bread while their father mended nets and told stories about the sea.

In the city, the trains were always late. People waited on the platform with coffee in their hands,
reading the news and checking the time. "It will come soon," said a woman to her friend. It did not.

Small models are useful for testing. A test should be quick, clear and honest: it runs the code,
compares the result with a reference, and fails when something is wrong. Good tests make it easy to
change the program without fear.

What is the weather like today? It is sunny and warm, with a light wind from the west. Tomorrow
there may be rain in the afternoon, so take an umbrella if you go out.
Numbers matter too: 1, 2, 3, 10, 42, 100 and 2024 appear in many texts.
"""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}"
    "{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]


def _paragraphs() -> list[str]:
    return [p.strip() for p in CORPUS.split("\n\n")]


def _chatml() -> tuple[str, dict]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in CHATML_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_paragraphs(), trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
    }
    return tok.to_str(pretty=True), config


def _llama() -> tuple[str, dict]:
    # Train merges on Metaspace words, then lay the vocab out like Llama: specials, 256 byte
    # tokens, then the learned pieces. Byte tokens must be ordinary vocab entries (not added
    # tokens) so that BPE byte fallback finds them and decoding does not skip them.
    # Training splits on "▁" so that, as in SentencePiece, no
    # piece spans two words; at run time Metaspace does not split (as converted Llama files do).
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=240, min_frequency=2, show_progress=False)
    trained.train_from_iterator(_paragraphs(), trainer)
    learned = json.loads(trained.to_str())["model"]
    pieces = sorted(learned["vocab"].items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {}
    for token in LLAMA_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]:
        vocab[token] = len(vocab)
    for piece, _ in pieces:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # An AddedToken-like dict, as many Llama-family repos write it.
        "bos_token": {
            "__type": "AddedToken",
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
        "chat_template": LLAMA_TEMPLATE,
    }
    return tok.to_str(pretty=True), config


@cache
def _build(style: str) -> tuple[str, str]:
    if style == "chatml":
        tokenizer_json, config = _chatml()
    elif style == "llama":
        tokenizer_json, config = _llama()
    else:
        raise ValueError(f"unknown tokenizer style {style!r} (expected 'chatml' or 'llama')")
    return tokenizer_json, json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False)


def write_tokenizer(directory: Path, style: str = "chatml") -> None:
    """Write tokenizer.json and tokenizer_config.json for the tiny `style` tokenizer."""
    tokenizer_json, config_json = _build(style)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(tokenizer_json + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(config_json + "\n", encoding="utf-8")


def write_sentencepiece(directory: Path, vocab_size: int = 400) -> Path:
    """A real SentencePiece BPE model (tokenizer.model, byte fallback) trained on CORPUS,
    plus a tokenizer_config.json with the Mixtral chat template — the files Mistral ships."""
    import io

    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path = directory / "tokenizer.model"
    path.write_bytes(buffer.getvalue())
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": LLAMA_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


def write_smollm2_tokenizer(directory: Path) -> int:
    """The bundled model's byte-level BPE (49152 tokens) as tokenizer.json and
    tokenizer_config.json, rebuilt from its GGUF vocabulary: a tokenizer llama.cpp's converter
    recognises (its pre-tokenizer hash is SmolLM's). Returns the vocabulary size."""
    from mer.io.gguf import GGUFFile
    from mer.models.gguf_vocab import build_tokenizer
    from mer.models.sources import resolve_model

    gg = GGUFFile(resolve_model(None))
    backend, _ = build_tokenizer(gg)
    tokens = gg.meta("tokenizer.ggml.tokens")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": tokens[gg.meta("tokenizer.ggml.bos_token_id")],
        "eos_token": tokens[gg.meta("tokenizer.ggml.eos_token_id")],
        "add_bos_token": False,
        "model_max_length": 2048,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return len(tokens)
