"""mer.tokenizer against transformers' AutoTokenizer on the offline test tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from mer.errors import ModelFormatError
from mer.tokenizer import Tokenizer
from tests.support.tokenizers import write_tokenizer

transformers = pytest.importorskip("transformers")

STYLES = ("chatml", "llama")
TEXTS = [
    "Hello world",
    "The river ran quietly past the old mill.",
    " leading space",
    "   three leading spaces and trailing  ",
    "two  spaces\n\nnew lines\tand a tab\n",
    "emoji 😀🎉 need bytes; café naïve Zürich 日本語 ∑ 𝔘",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<s>[INST] hi [/INST] ok</s> <unk>",
    "Numbers: 1, 2, 3, 42 and 2024!",
    "",
    " ",
    "\n",
]
# Hypothesis text: printable characters across scripts plus emoji, without surrogates.
text_st = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x1F9FF), max_size=40
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for style in STYLES:
        write_tokenizer(root / style, style)
        out[style] = root / style
    return out


@pytest.fixture(scope="module")
def pairs(dirs: dict[str, Path]) -> dict[str, tuple[Tokenizer, object]]:
    auto = transformers.AutoTokenizer
    return {s: (Tokenizer.from_hf_dir(d), auto.from_pretrained(str(d))) for s, d in dirs.items()}


def _check_same(ours: Tokenizer, ref: object, text: str) -> None:
    ids = ours.encode(text)
    assert ids == ref(text)["input_ids"], text
    assert (
        ours.encode(text, add_special_tokens=False)
        == ref(text, add_special_tokens=False)["input_ids"]
    )
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.parametrize("style", STYLES)
def test_fixture_is_small_and_deterministic(style: str, tmp_path: Path, dirs) -> None:
    write_tokenizer(tmp_path, style)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (dirs[style] / name).read_bytes()
    assert Tokenizer.from_hf_dir(tmp_path).vocab_size <= 500


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pairs, style: str, text: str) -> None:
    ours, ref = pairs[style]
    _check_same(ours, ref, text)


@pytest.mark.parametrize("style", STYLES)
def test_encode_decode_match_transformers_random(pairs, style: str) -> None:
    ours, ref = pairs[style]

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(text_st)
    def check(text: str) -> None:
        _check_same(ours, ref, text)

    check()


def test_special_ids_and_bos(pairs) -> None:
    chatml, ref = pairs["chatml"]
    assert chatml.bos_token_id == ref.bos_token_id
    assert chatml.eos_token_ids == {ref.eos_token_id}
    assert chatml.vocab_size == len(ref)
    llama, ref = pairs["llama"]
    assert llama.encode("hi")[0] == llama.bos_token_id == 1
    assert llama.eos_token_ids == {2}
    # byte fallback: an emoji the vocab lacks becomes its four UTF-8 byte tokens
    assert llama.encode("😀", add_special_tokens=False)[-4:] == [
        3 + 0xF0,
        3 + 0x9F,
        3 + 0x98,
        3 + 0x80,
    ]


def _stream(tok: Tokenizer, ids: list[int], flush: bool = False) -> list[str]:
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()] if flush else pieces


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_concatenates_to_decode(pairs, style: str, text: str) -> None:
    tok = pairs[style][0]
    ids = tok.encode(text)
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


@pytest.mark.parametrize("style", STYLES)
def test_stream_decoder_random_text(pairs, style: str) -> None:
    tok = pairs[style][0]

    @settings(max_examples=80, deadline=None, derandomize=True, database=None)
    @given(st.lists(text_st, min_size=1, max_size=3))
    def check(parts: list[str]) -> None:
        # Concatenated encodings also put words and byte runs right after a BOS/window start.
        ids = [i for part in parts for i in tok.encode(part)]
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids)
        assert all("\ufffd" not in piece for piece in pieces)

    check()


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_random_ids(pairs, style: str, skip: bool) -> None:
    tok = pairs[style][0]
    # Byte-level BPE decodes any id sequence locally; for byte fallback, stray <0xNN> ids make
    # invalid UTF-8 (see StreamDecoder), so the llama case draws from the other ids.
    allowed = [i for i in range(tok.vocab_size) if style == "chatml" or not 3 <= i < 259]

    @settings(max_examples=80, deadline=None, derandomize=True, database=None)
    @given(st.lists(st.sampled_from(allowed), max_size=30))
    def check(ids: list[int]) -> None:
        decoder = tok.stream_decoder(skip_special_tokens=skip)
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)

    check()


@pytest.mark.parametrize("style", STYLES)
def test_stream_decoder_holds_split_characters(pairs, style: str) -> None:
    tok = pairs[style][0]
    ids = tok.encode("a😀", add_special_tokens=False)
    assert len(ids) >= 4  # the emoji is spread over several byte tokens
    pieces = _stream(tok, ids)
    assert pieces[-4:-1] == ["", "", ""]
    assert pieces[-1].endswith("😀")
    assert "".join(pieces) == "a😀"
    # A truncated character stays held until flush.
    decoder = tok.stream_decoder()
    assert "".join(decoder.push(i) for i in ids[:-1]) == "a"
    assert decoder.flush() == tok.decode(ids[:-1])[1:]


def test_stream_decoder_keeps_word_start_spaces(pairs) -> None:
    tok = pairs["llama"][0]
    ids = tok.encode("the river ran")
    pieces = _stream(tok, ids)
    assert pieces[0] == "" and pieces[1] == "the"  # <s> is skipped
    assert "".join(pieces) == "the river ran"
    assert any(piece.startswith(" ") for piece in pieces[2:])


def test_eos_ids_from_generation_config(dirs, tmp_path: Path) -> None:
    shutil.copytree(dirs["llama"], tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5, "bos_token_id": 1}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.eos_token_ids == frozenset({2, 5, 7, 9})
    assert tok.bos_token_id == 1


def _assert_one_line_naming(err: pytest.ExceptionInfo, name: str) -> None:
    message = str(err.value)
    assert name in message and "\n" not in message


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError) as err:
        Tokenizer.from_hf_dir(tmp_path)
    _assert_one_line_naming(err, "tokenizer.json")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("tokenizer.json", '{"version": "1.0", "model": {'),
        ("tokenizer.json", '{"version": "1.0"}'),
        ("tokenizer.json", "[1, 2]"),
        ("tokenizer_config.json", "{not json"),
        ("tokenizer_config.json", '{"eos_token": 5}'),
        ("generation_config.json", '{"eos_token_id": "x"}'),
    ],
)
def test_corrupt_files(dirs, tmp_path: Path, name: str, content: str) -> None:
    shutil.copytree(dirs["chatml"], tmp_path, dirs_exist_ok=True)
    (tmp_path / name).write_text(content)
    with pytest.raises(ModelFormatError) as err:
        Tokenizer.from_hf_dir(tmp_path)
    _assert_one_line_naming(err, name)


def test_config_add_bos_token_does_not_override_tokenizer_json(dirs, tmp_path: Path) -> None:
    # transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists; so do we.
    shutil.copytree(dirs["llama"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert Tokenizer.from_hf_dir(tmp_path).encode("the mill") == ref("the mill")["input_ids"]


def test_config_special_token_missing_from_vocab_is_added(dirs, tmp_path: Path) -> None:
    shutil.copytree(dirs["chatml"], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(eos_token="<|stop|>", extra_special_tokens=["<tool>"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = Tokenizer.from_hf_dir(tmp_path)
    text = "the<|stop|> mill <tool>"
    assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.eos_token_ids == {ref.eos_token_id}
    assert tok.decode(tok.encode(text)) == ref.decode(
        ref(text)["input_ids"], skip_special_tokens=True
    )


def test_from_parts_add_bos(dirs) -> None:
    backend = tokenizers.Tokenizer.from_file(str(dirs["llama"] / "tokenizer.json"))
    before = backend.to_str()
    kwargs = dict(bos_token="<s>", eos_token="</s>", chat_template=None, eos_token_ids=[7])
    keep = Tokenizer.from_parts(backend, **kwargs)
    on = Tokenizer.from_parts(backend, add_bos=True, **kwargs)
    off = Tokenizer.from_parts(backend, add_bos=False, **kwargs)
    plain = off.encode("the mill")
    assert plain[0] != 1
    assert keep.encode("the mill") == on.encode("the mill") == [1, *plain]
    assert keep.eos_token_ids == {2, 7}
    assert backend.to_str() == before  # the caller's backend is untouched
    with pytest.raises(ModelFormatError):
        Tokenizer.from_parts(
            backend, bos_token=None, eos_token=None, chat_template=None, add_bos=True
        )


def test_special_tokens_map_overrides_config(dirs, tmp_path: Path) -> None:
    shutil.copytree(dirs["chatml"], tmp_path, dirs_exist_ok=True)
    tokens_map = {
        "eos_token": {"content": "<|endoftext|>", "lstrip": False, "rstrip": False},
        "sep_token": "<sep>",
        "additional_special_tokens": ["<extra>"],
    }
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(tokens_map))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = Tokenizer.from_hf_dir(tmp_path)
    text = "a<extra>b<sep>c<|endoftext|>"
    assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.eos_token_ids == {ref.eos_token_id} == {0}
    assert tok.vocab_size == len(ref)


@pytest.mark.parametrize("kind", ["wordlevel", "llama"])
def test_clean_up_tokenization_spaces(dirs, tmp_path: Path, kind: str) -> None:
    # transformers applies the clean-up only to non-BPE models; BPE ones ignore the flag.
    if kind == "wordlevel":
        words = ["[UNK]", "hello", ",", "world", ".", "it", "!"]
        backend = tokenizers.Tokenizer(
            tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
        )
        backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        backend.save(str(tmp_path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}
    else:
        shutil.copytree(dirs["llama"], tmp_path, dirs_exist_ok=True)
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = Tokenizer.from_hf_dir(tmp_path)
    ids = tok.encode("hello , world . it ! the mill , ok .")
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    if kind == "wordlevel":
        assert tok.decode(ids).startswith("hello, world. it!")
