"""Structured output: generation held to a JSON schema (OpenAI `response_format`, tool calls).

The grammar library is llguidance (Microsoft's; Rust, MIT; no Python dependencies), chosen by
measurement against xgrammar and outlines-core with bench/grammar.py: each library replays the
tokenization of valid JSON documents, timing every step's allowed-token mask, on this project's
2-core machine, trials with other processes using over 5% of the CPUs dropped. Per-token mask
µs (median / p99) and grammar compile ms, for any JSON object (json_object) and a nested schema:

    vocabulary            grammar   llguidance          xgrammar            outlines-core
    SmolLM2 49,152 ids    any        8.1 /  60   0.9 ms   8.0 /  21   6.5 ms   14.2 / 166  10.4 s
                          schema    15.1 /  78   2.6 ms   2.5 /  13   7.5 ms    3.4 / 158   0.30 s
    Qwen2 151,936 ids     any       21.2 / 145   1.1 ms  60.1 / 161  28.1 ms      n/a        28 s
                          schema    30.5 / 110   3.1 ms   6.8 / 105  35.7 ms      n/a       3.1 s

Applying a mask to the logits row (here, numpy, whichever library) costs 27 µs at 49k and
74 µs at 152k, and SmolLM2 decodes about 100 tokens/s on this machine (10 ms a token): every
library's mask is under 1% of a step. No library is cheapest everywhere: xgrammar's masks,
precomputed per grammar state, win on the schema (forced keys and enums); llguidance's, walked
from a lexer and an Earley parser, win on free text at 152k, where xgrammar's slowest; outlines-
core's are table look-ups but its compile (a regular expression indexed against the whole
vocabulary) takes seconds to minutes per schema and cannot express recursion beyond a fixed
depth. Between the two cheap ones the rest decides: llguidance compiles in 1-3 ms at either
vocabulary (xgrammar 7-36 ms), reports an unsupported or contradictory schema as a one-line
error before any token, and installs as one small wheel, where `import xgrammar` imports torch
and the package requires triton and transformers (about a gigabyte) in an engine that otherwise
runs without torch. llguidance's p99 is the first masks of a sequence paying for the lexer
states they discover.

How the engine uses it, per sequence:

    grammar = compile_response_format(request["response_format"], tokenizer)  # None: free text
    matcher = grammar.matcher()
    every step:   matcher.mask_logits(logits)      # the model's float32 row, in place
                  token = sample(logits)
                  matcher.advance(token)
                  if matcher.done: finish with the end-of-sequence (stop)

Compiled grammars are cached per tokenizer and grammar, so a request pays for compiling only the
first time its schema is seen; a matcher is a copy of the compiled grammar's start state.
End-of-sequence ids (the tokenizer's `eos_token_ids`) are allowed only where the grammar accepts
the text so far; once `done`, they are all that is allowed.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import Any

import llguidance
import numpy as np

from mer.errors import MerError, ParamError
from mer.tokenizer import Tokenizer

# Whitespace allowed between JSON tokens: none, one space, or a line break and an indent of up to
# 40 spaces or tabs (as llama.cpp's JSON grammars allow). Unbounded whitespace lets a small model
# write blank lines until max_tokens.
WHITESPACE = r"(?: |\r?\n[ \t]{0,40})"
# llguidance's JSON settings: that whitespace, and any \u escape in strings (json.dumps writes
# "caf\u00e9"; llguidance's default allows only control characters escaped).
JSON_OPTIONS = {"whitespace_pattern": WHITESPACE, "json_allow_general_unicode_escapes": True}
_GRAMMARS_PER_TOKENIZER = 256  # compiled grammars kept per tokenizer, least recently used dropped
_MESSAGE_CHARS = 300  # a library message is cut to this length in an error


class SchemaError(ParamError):
    """A response_format or tool that cannot be compiled to a grammar. `name` is the request
    field at fault (`response_format.json_schema.schema`), as in every ParamError."""


class StructuredOutputError(MerError):
    """A token fed to a matcher that its grammar does not allow (a caller's bug: tokens should
    be sampled from masked logits)."""


def _one_line(text: object, limit: int = _MESSAGE_CHARS) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# -- the tokenizer adapter ---------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_OF = _byte_level_alphabet()


def _decoder_steps(decoder: dict | None) -> list[dict]:
    if not decoder:
        return []
    if decoder.get("type") == "Sequence":
        return [step for d in decoder.get("decoders", []) for step in _decoder_steps(d)]
    return [decoder]


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], frozenset[int]]:
    """Every token id's bytes as generated text contains them, and the ids of special tokens
    (control tokens such as EOS, whose text a grammar never matches).

    Byte-level BPE pieces (GPT-2's alphabet: SmolLM2, Llama 3, Qwen) map back to their bytes;
    SentencePiece-style pieces have their word-start marker replaced by a space and byte-fallback
    pieces (<0x0A>) become that byte. Ids the vocabulary leaves unused get b"".
    """
    data = json.loads(tokenizer.backend_json())
    steps = _decoder_steps(data.get("decoder"))
    kinds = {step.get("type") for step in steps}
    replaces = [
        (step["pattern"]["String"], step.get("content", ""))
        for step in steps
        if step.get("type") == "Replace" and "String" in (step.get("pattern") or {})
    ]
    replaces += [
        (step.get("replacement", "▁"), " ") for step in steps if step["type"] == "Metaspace"
    ]
    pieces: list[str | None] = [None] * tokenizer.vocab_size
    vocab = (data.get("model") or {}).get("vocab") or {}
    entries = vocab.items() if isinstance(vocab, dict) else ((v[0], i) for i, v in enumerate(vocab))
    for piece, i in entries:  # a Unigram vocabulary is a list of [piece, score]
        if 0 <= i < len(pieces):
            pieces[i] = piece
    special = set()
    for added in data.get("added_tokens", []):
        if 0 <= added["id"] < len(pieces):
            pieces[added["id"]] = added["content"]
            if added.get("special"):
                special.add(added["id"])
    out = []
    for i, piece in enumerate(pieces):
        if piece is None:
            out.append(b"")
        elif i in special:
            out.append(piece.encode())
        elif "ByteLevel" in kinds and all(c in _BYTE_OF for c in piece):
            out.append(bytes(_BYTE_OF[c] for c in piece))
        elif "ByteFallback" in kinds and len(piece) == 6 and piece[:3] == "<0x" and piece[5] == ">":
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            for old, new in replaces:
                piece = piece.replace(old, new)
            out.append(piece.encode())
    return out, frozenset(special)


class _TokenizerSource:
    """mer's Tokenizer in the shape llguidance.TokenizerWrapper reads."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        tokens, special = token_bytes(tokenizer)
        # llguidance marks special tokens with a leading 0xFF (never a byte of UTF-8 text), so
        # that no grammar matches their text; a plain token starting with that byte (byte-level
        # vocabularies have the lone byte) could never be part of UTF-8 text either.
        self.tokens = [
            b"\xff" + t if i in special else (b"" if t[:1] == b"\xff" else t)
            for i, t in enumerate(tokens)
        ]
        self.special_token_ids = sorted(special)
        eos = sorted(tokenizer.eos_token_ids)
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text, not bytes")  # TokenizerWrapper then passes str
        return self._tokenizer.encode(text, add_special_tokens=False)


class _Vocabulary:
    """llguidance's view of one tokenizer, and the grammars compiled against it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.size = tokenizer.vocab_size
        self.eos_ids = tuple(sorted(tokenizer.eos_token_ids))
        source = _TokenizerSource(tokenizer)
        self.lltokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(source), n_vocab=self.size, eos_token=list(self.eos_ids)
        )
        self.grammars: OrderedDict[str, Grammar] = OrderedDict()


_LOCK = threading.Lock()
_VOCABULARIES: weakref.WeakKeyDictionary[Tokenizer, _Vocabulary] = weakref.WeakKeyDictionary()


def _vocabulary(tokenizer: Tokenizer) -> _Vocabulary:
    with _LOCK:
        vocab = _VOCABULARIES.get(tokenizer)
        if vocab is None:
            vocab = _VOCABULARIES[tokenizer] = _Vocabulary(tokenizer)
        return vocab


def lltokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for `tokenizer` (built once per Tokenizer object)."""
    return _vocabulary(tokenizer).lltokenizer


# -- grammars and matchers ---------------------------------------------------------------------


class Grammar:
    """A grammar compiled for one tokenizer. Shared by every sequence that asks for it."""

    def __init__(self, vocab: _Vocabulary, text: str, start: llguidance.LLMatcher) -> None:
        self._vocab = vocab
        self.text = text  # llguidance's grammar (JSON), the cache key
        self._start = start

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size; ids from here on are never allowed."""
        return self._vocab.size

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._vocab.eos_ids

    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the grammar, for one sequence."""
        return Matcher(self, self._start.deep_copy())


class Matcher:
    """Where one sequence is in its grammar: which tokens may come next."""

    def __init__(self, grammar: Grammar, matcher: llguidance.LLMatcher) -> None:
        self.grammar = grammar
        self._m = matcher
        self._n = grammar.vocab_size
        self._words = np.empty((self._n + 31) // 32, np.int32)
        self._allowed: np.ndarray | None = None  # this step's mask, one bool per token id

    def allowed(self) -> np.ndarray:
        """The tokens allowed next: a bool per id of the tokenizer's vocabulary (read-only)."""
        if self._allowed is None:
            self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            self._check()
            bits = np.unpackbits(self._words.view(np.uint8), count=self._n, bitorder="little")
            self._allowed = bits.view(np.bool_)
            self._allowed.flags.writeable = False
        return self._allowed

    def mask_logits(self, logits: np.ndarray) -> None:
        """Set the logits of every token the grammar does not allow next to -inf, in place.
        `logits` is one row of the model's vocabulary, which may be larger than the tokenizer's:
        ids past the tokenizer's vocabulary are never allowed."""
        if logits.ndim != 1:
            raise ValueError(f"logits must be one row, got shape {logits.shape}")
        allowed = self.allowed()
        n = min(self._n, logits.shape[0])
        np.copyto(logits[:n], -np.inf, where=~allowed[:n])
        logits[n:] = -np.inf

    def advance(self, token_id: int) -> None:
        """Move past `token_id`, the token generated at this step. A token the grammar does not
        allow here raises StructuredOutputError and leaves the matcher as it was."""
        token_id = int(token_id)
        if not 0 <= token_id < self._n:
            allowed = False
        elif self._allowed is not None:
            allowed = bool(self._allowed[token_id])
        else:  # not masked this step (a token forced by the caller)
            allowed = self._m.validate_tokens([token_id]) == 1
        if not allowed:
            raise StructuredOutputError(f"token {token_id} is not allowed by the grammar here")
        if not self._m.consume_token(token_id):
            raise StructuredOutputError(
                f"grammar matcher failed at token {token_id}: {_one_line(self._m.get_error())}"
            )
        self._allowed = None

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing can follow: the sequence should end now (with
        the end-of-sequence, the only token still allowed)."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text so far is a whole match: end-of-sequence is allowed next."""
        return self._m.is_accepting()

    def _check(self) -> None:
        if self._m.is_error():
            raise StructuredOutputError(f"grammar matcher failed: {_one_line(self._m.get_error())}")


def compile_schema(
    schema: Any, tokenizer: Tokenizer, *, strict: bool = True, name: str = "schema"
) -> Grammar:
    """The grammar of JSON text that satisfies `schema` (a JSON Schema: a dict, or true).

    strict: reject keywords the grammar cannot enforce (an unknown `format`, say); otherwise
    they are ignored, and the output satisfies the rest of the schema. `name` is the request
    field a SchemaError names."""
    if schema is True or schema == {}:
        schema = {}
    if not isinstance(schema, dict):
        raise SchemaError(name, f"must be a JSON Schema object, got {type(schema).__name__}")
    options = {**JSON_OPTIONS, "lenient": not strict}
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except (ValueError, TypeError) as err:
        raise SchemaError(name, f"is not a valid JSON schema ({_one_line(err)})") from None
    return _compile(tokenizer, text, name)


def _compile(tokenizer: Tokenizer, text: str, name: str) -> Grammar:
    vocab = _vocabulary(tokenizer)
    with _LOCK:
        grammar = vocab.grammars.get(text)
        if grammar is not None:
            vocab.grammars.move_to_end(text)
            return grammar
    error = llguidance.LLMatcher.validate_grammar(text, vocab.lltokenizer)
    if error:
        raise SchemaError(name, f"is not a valid JSON schema ({_one_line(error)})")
    start = llguidance.LLMatcher(vocab.lltokenizer, text, log_level=0)
    if start.is_error():
        raise SchemaError(name, f"is not a valid JSON schema ({_one_line(start.get_error())})")
    grammar = Grammar(vocab, text, start)
    with _LOCK:
        vocab.grammars[text] = grammar
        while len(vocab.grammars) > _GRAMMARS_PER_TOKENIZER:
            vocab.grammars.popitem(last=False)
    return grammar


def compile_response_format(response_format: Any, tokenizer: Tokenizer) -> Grammar | None:
    """The grammar for an OpenAI `response_format`: None for {"type": "text"} (no constraint),
    any JSON object for {"type": "json_object"}, and the schema's JSON for
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
    field = "response_format"
    if not isinstance(response_format, dict):
        raise SchemaError(field, "must be an object with a type")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return compile_schema({"type": "object"}, tokenizer, name=field)
    if kind != "json_schema":
        raise SchemaError(
            f"{field}.type", f"must be text, json_object or json_schema, got {kind!r}"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise SchemaError(f"{field}.json_schema", "must be an object with a name and a schema")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise SchemaError(f"{field}.json_schema.name", "must be a non-empty string")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise SchemaError(f"{field}.json_schema.strict", "must be true or false")
    schema = spec.get("schema", {})  # OpenAI: no schema means any JSON object
    if schema == {}:
        schema = {"type": "object"}
    return compile_schema(
        schema, tokenizer, strict=bool(strict), name=f"{field}.json_schema.schema"
    )


def _function(tool: Any, field: str) -> dict:
    """The function of an OpenAI tool ({"type": "function", "function": {...}}) or the function
    itself."""
    if isinstance(tool, dict) and tool.get("type") == "function" and "function" in tool:
        tool = tool["function"]
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
        raise SchemaError(field, "must be a function with a name")
    return tool


def _parameters(function: dict, field: str) -> Any:
    schema = function.get("parameters", {"type": "object"})  # OpenAI: omitted means no arguments
    return {"type": "object"} if schema == {} else schema


def compile_tool_arguments(tool: Any, tokenizer: Tokenizer, field: str = "tools") -> Grammar:
    """The grammar of the arguments of a call to one function: a JSON object satisfying its
    `parameters` schema. `tool` is an OpenAI tool or its `function`."""
    function = _function(tool, field)
    name = function["name"]
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise SchemaError(f"{field}[{name}].strict", "must be true or false")
    schema = _parameters(function, field)
    return compile_schema(
        schema, tokenizer, strict=bool(strict), name=f"{field}[{name}].function.parameters"
    )


_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # values, not schemas


def _rebase(schema: Any, prefix: str) -> Any:
    """`schema` with its local references ("#/$defs/x") pointing into `prefix`, the JSON pointer
    where it is placed inside a larger schema."""
    if isinstance(schema, list):
        return [_rebase(item, prefix) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = prefix + value[1:]
        elif key in _DATA_KEYWORDS:
            out[key] = value
        else:
            out[key] = _rebase(value, prefix)
    return out


def compile_tool_call(tools: Any, tokenizer: Tokenizer, field: str = "tools") -> Grammar:
    """The grammar of one call to any of `tools` (tool_choice "required"): a JSON object
    {"name": <a tool's name>, "arguments": <an object satisfying that tool's parameters>}."""
    if not isinstance(tools, list | tuple) or not tools:
        raise SchemaError(field, "must be a non-empty list of functions")
    choices = []
    strict = True
    for i, tool in enumerate(tools):
        function = _function(tool, f"{field}[{i}]")
        strict = strict and bool(function.get("strict"))
        where = "#/properties/arguments" if len(tools) == 1 else f"#/anyOf/{i}/properties/arguments"
        choices.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": function["name"]},
                    "arguments": _rebase(_parameters(function, field), where),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
    return compile_schema(schema, tokenizer, strict=strict, name=field)
