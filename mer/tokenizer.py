"""Text <-> token ids for a model, as transformers' AutoTokenizer gives them for the same files.

The heavy lifting is the Rust `tokenizers` backend; this module reproduces the few things
transformers adds on top of tokenizer.json: the special tokens named in tokenizer_config.json,
the chat template, decode clean-up, and the EOS ids gathered from the model's config files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, processors

from mer.chat import render_template
from mer.errors import ModelFormatError

# The named special tokens transformers knows; any other `*_token` string in the config is also
# a special token there (and a chat template variable).
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
_NAMED_TOKENS += ("mask_token",)
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None if there is no such file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelFormatError(f"{path}: cannot read JSON ({_one_line(err)})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _as_added_token(value: Any, source: Path, key: str) -> AddedToken | None:
    """A config token value (a string or an AddedToken-like dict) as a special AddedToken."""
    if value is None:
        return None
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        fields = {k: v for k, v in value.items() if k in _ADDED_TOKEN_FIELDS}
        return AddedToken(**{**fields, "special": True})
    raise ModelFormatError(f"{source}: {key} must be a string or a dict with 'content'")


def _ids_field(data: dict | None, key: str, source: Path) -> list[int]:
    value = None if data is None else data.get(key)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelFormatError(f"{source}: {key} must be an integer or a list of integers")
    return values


def _pick_template(value: Any, source: Path) -> str | None:
    """tokenizer_config's chat_template: a string, or named templates of which "default" is used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        try:
            value = {item["name"]: item["template"] for item in value}
        except (TypeError, KeyError):
            raise ModelFormatError(f"{source}: chat_template list needs name/template") from None
    if isinstance(value, dict):
        template = value.get("default")
        return template if isinstance(template, str) else None
    raise ModelFormatError(f"{source}: chat_template must be a string or a list of templates")


def _config_tokens(config: dict, source: Path) -> tuple[dict, list[AddedToken], list[AddedToken]]:
    """tokenizer_config's named special tokens, its added_tokens_decoder, and its extra tokens."""
    named = {}
    for key, value in config.items():
        custom = isinstance(value, str) or (isinstance(value, dict) and "content" in value)
        if key in _NAMED_TOKENS or (key.endswith("_token") and custom):
            if (token := _as_added_token(value, source, key)) is not None:
                named[key] = token
    added_map = config.get("added_tokens_decoder") or {}
    if not isinstance(added_map, dict):
        raise ModelFormatError(f"{source}: added_tokens_decoder must be an object")
    added = []
    for index in sorted(added_map, key=lambda k: int(k) if str(k).isdigit() else -1):
        fields = added_map[index]
        if not isinstance(fields, dict) or not isinstance(fields.get("content"), str):
            raise ModelFormatError(f"{source}: added_tokens_decoder[{index}] is malformed")
        added.append(AddedToken(**{k: v for k, v in fields.items() if k in _ADDED_TOKEN_FIELDS}))
    extra_list = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    extra = []
    for value in extra_list if isinstance(extra_list, list) else []:
        if (token := _as_added_token(value, source, "additional_special_tokens")) is not None:
            extra.append(token)
    return named, added, extra


def _tokens_to_add(
    backend: tokenizers.Tokenizer, always: list[AddedToken], if_missing: Iterable[AddedToken]
) -> list[AddedToken]:
    """As transformers does: re-add `always` (their flags win), then the `if_missing` tokens the
    backend lacks; one list, so that any new ids are given out in this order."""
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    known |= {t.content for t in always}
    out = list(always)
    for token in if_missing:
        if token.content not in known:
            out.append(token)
            known.add(token.content)
    return out


class Tokenizer:
    """A model's tokenizer: encode/decode, streaming decode, and chat template rendering."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, AddedToken],
        chat_template: str | None,
        add_tokens: Sequence[AddedToken] = (),
        eos_token_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
        clean_up_spaces: bool = False,
        split_special_tokens: bool = False,
        source: str = "tokenizer",
    ) -> None:
        self._backend = backend
        # transformers disables these at encode time unless asked; we never ask.
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = split_special_tokens
        if add_tokens:
            backend.add_tokens(list(add_tokens))
        self._source = source
        self._template_tokens = {k: t.content for k, t in special_tokens.items()}
        self.bos_token: str | None = self._template_tokens.get("bos_token")
        self.eos_token: str | None = self._template_tokens.get("eos_token")
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        bos_id = None if self.bos_token is None else backend.token_to_id(self.bos_token)
        self.bos_token_id: int | None = bos_id if bos_id is not None else bos_token_id
        eos = {int(i) for i in eos_token_ids}
        if self.eos_token is not None and backend.token_to_id(self.eos_token) is not None:
            eos.add(backend.token_to_id(self.eos_token))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        # transformers skips its (WordPiece-era) clean-up for BPE models.
        self._clean_up = clean_up_spaces and type(backend.model).__name__ != "BPE"

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """Load tokenizer.json (required) and the optional config files of a Hugging Face model."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(
                f"{tokenizer_file}: file not found; a Hugging Face tokenizer needs it"
            )
        try:
            backend = tokenizers.Tokenizer.from_str(tokenizer_file.read_text(encoding="utf-8"))
        except Exception as err:  # the Rust parser raises bare Exceptions
            raise ModelFormatError(
                f"{tokenizer_file}: not a valid tokenizer ({_one_line(err)})"
            ) from None
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) or {}
        special, added, extra = _config_tokens(config, config_file)
        # Like transformers: without added_tokens_decoder, special_tokens_map.json overrides.
        map_file = path / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and (tokens_map := _read_json(map_file)):
            map_special, _, map_extra = _config_tokens(tokens_map, map_file)
            special.update(map_special)
            extra += [t for t in map_extra if t.content not in {e.content for e in extra}]
        to_add = _tokens_to_add(backend, added, [*special.values(), *extra])
        # A standalone chat_template.jinja takes priority over the config entry, as in transformers.
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            try:
                chat_template = jinja_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ModelFormatError(f"{jinja_file}: cannot read ({_one_line(err)})") from None
        else:
            chat_template = _pick_template(config.get("chat_template"), config_file)
        # add_bos_token/add_eos_token are deliberately not applied: transformers 5 drops them when
        # tokenizer.json exists, so its post-processor alone decides what encode() adds.
        eos_ids: list[int] = []
        bos_ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            data = _read_json(path / name)
            eos_ids += _ids_field(data, "eos_token_id", path / name)
            bos_ids += _ids_field(data, "bos_token_id", path / name)
        return cls(
            backend,
            special_tokens=special,
            chat_template=chat_template,
            add_tokens=to_add,
            eos_token_ids=eos_ids,
            bos_token_id=bos_ids[0] if bos_ids else None,
            clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            split_special_tokens=bool(config.get("split_special_tokens", False)),
            source=str(path),
        )

    @classmethod
    def from_parts(
        cls,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        eos_token_ids: Iterable[int] = (),
        add_bos: bool | None = None,
        source: str = "tokenizer",
    ) -> Tokenizer:
        """Wrap a backend built elsewhere (e.g. from GGUF metadata); `source` names it in errors.

        add_bos None keeps the backend's post-processor; True/False replaces it with one that
        does (or does not) put the BOS token first, as transformers does for `add_bos_token`.
        """
        backend = tokenizers.Tokenizer.from_str(backend.to_str())  # never mutate the caller's
        special = {}
        for key, value in (("bos_token", bos_token), ("eos_token", eos_token)):
            if value is not None:
                special[key] = AddedToken(value, special=True, normalized=False)
        tok = cls(
            backend,
            special_tokens=special,
            chat_template=chat_template,
            add_tokens=_tokens_to_add(backend, [], special.values()),
            eos_token_ids=eos_token_ids,
            source=source,
        )
        if add_bos is not None:
            if add_bos and tok.bos_token_id is None:
                raise ModelFormatError(f"{source}: asks to add a BOS token but defines none")
            single = f"{bos_token}:0 $A:0" if add_bos else "$A:0"
            pair = f"{single} {bos_token}:1 $B:1" if add_bos else "$A:0 $B:1"
            pairs = [(bos_token, tok.bos_token_id)] if add_bos else []
            backend.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=pairs
            )
        return tok

    def backend_json(self) -> str:
        """The backend as tokenizer.json text (added tokens and post-processor included)."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special tokens written in the text are recognised."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`, as transformers' `decode` gives it."""
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for before, after in _CLEAN_UP:
                text = text.replace(before, after)
        return text

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh incremental decoder for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        template_kwargs: dict | None = None,
    ) -> str:
        """The prompt text for `messages` (and `tools`, OpenAI-style function definitions, for
        templates that render them), as `apply_chat_template(tokenize=False)` gives it.
        `template_kwargs` are further template variables, e.g. Qwen3's `enable_thinking`."""
        if self.chat_template is None:
            raise ModelFormatError(f"{self._source}: the model has no chat template")
        extra = {
            k: v for k, v in self._template_tokens.items() if k not in ("bos_token", "eos_token")
        }
        return render_template(
            self.chat_template,
            messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
            **{**extra, **(template_kwargs or {})},
            **({"tools": tools} if tools else {}),
        )

    def encode_chat(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list | None = None,
        template_kwargs: dict | None = None,
    ) -> list[int]:
        """Prompt ids for `messages`; the template writes any BOS, so none is added again."""
        text = self.render_chat(messages, add_generation_prompt, tools, template_kwargs)
        return self.encode(text, False)


_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")]
_CLEAN_UP += [(" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


class StreamDecoder:
    """Turns generated ids into text one id at a time.

    Each push decodes a short window of recent ids and returns only the text that window added,
    so SentencePiece word-start spaces and the tokenizer's first-token stripping come out exactly
    as in a full decode. Text ending in U+FFFD (an incomplete UTF-8 character, byte-level or
    byte-fallback) is held back until a later id completes it; flush() returns what is still held
    at the end. For valid UTF-8 output the pushes join to decode(ids). One known gap: a
    byte-fallback run that is already valid and then continued by a stray byte (invalid UTF-8,
    only seen from untrained models) decodes to U+FFFDs in full, but its valid start was already
    streamed; holding every run instead would stall CJK text for whole runs.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # ids before this have been emitted
        self._prefix_text = ""  # decode(ids[prefix:read])

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Return whatever is still held back (e.g. a truncated character at the end)."""
        text = self._decode(self._ids[self._prefix :])
        return self._advance(text) if len(text) > len(self._prefix_text) else ""

    def _advance(self, text: str) -> str:
        new = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        return new
