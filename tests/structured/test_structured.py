"""mer.structured with SmolLM2's real tokenizer: sequences drawn at random from the mask always
parse as JSON and satisfy their schema; errors are one line; ids past the vocabulary never pass."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from mer.errors import MerError, ParamError
from mer.models.loading import load_tokenizer
from mer.models.sources import resolve_model
from mer.structured import (
    SchemaError,
    StructuredOutputError,
    compile_response_format,
    compile_schema,
    compile_tool_arguments,
    compile_tool_call,
    token_bytes,
)

SEQUENCES = 10  # random sequences per schema
TOKEN_CAP = 600  # generous: biased sampling finishes these schemas in well under 200 tokens
EXTRA_IDS = 64  # the model's vocabulary may be padded past the tokenizer's

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string"},
                    "city": {"type": "string"},
                    "geo": {
                        "type": "object",
                        "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                        "required": ["lat", "lon"],
                        "additionalProperties": False,
                    },
                },
                "required": ["city", "geo"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
            "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            "points": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                    "required": ["x", "y"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["tags", "matrix", "points"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"enum": ["S", "M", "L", 42, None, True]},
            "status": {"type": "string", "enum": ["pending", "paid", "shipped"]},
            "kind": {"const": "order"},
        },
        "required": ["color", "size", "status", "kind"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": 0, "maximum": 100},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "delta": {"type": "number"},
            "big": {"type": "integer"},
            "flag": {"type": "boolean"},
        },
        "required": ["count", "ratio", "delta", "big", "flag"],
        "additionalProperties": False,
    },
    "required_and_refs": {
        "$defs": {
            "item": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
                    "qty": {"type": "integer", "minimum": 1},
                    "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1},
            "comment": {"type": "string", "maxLength": 20},
            "gift": {"type": "boolean"},
        },
        "required": ["id", "items"],
        "additionalProperties": False,
    },
    "top_level_integer": {"type": "integer"},
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="module")
def closers(tok) -> np.ndarray:
    """A logit bonus for tokens that end things (quotes, brackets, commas) and for EOS, so
    that random sequences finish in a few dozen tokens."""
    tokens, special = token_bytes(tok)
    bonus = np.zeros(tok.vocab_size + EXTRA_IDS, np.float32)
    for i, t in enumerate(tokens):
        if i not in special and any(c in t for c in b'"}],'):
            bonus[i] = 4.0
    bonus[sorted(tok.eos_token_ids)] = 4.0
    return bonus


def sample_sequence(tok, grammar, rng, bonus) -> list[int]:
    """Draw tokens from the mask applied to random logits until the grammar is done or EOS
    comes; check the EOS rule at every step."""
    matcher = grammar.matcher()
    eos = sorted(tok.eos_token_ids)
    out: list[int] = []
    for _ in range(TOKEN_CAP):
        logits = rng.standard_normal(tok.vocab_size + EXTRA_IDS, dtype=np.float32)
        if rng.random() < 0.6:
            logits += bonus
        matcher.mask_logits(logits)
        assert np.isneginf(logits[tok.vocab_size :]).all()
        allowed = np.isfinite(logits)
        assert allowed[eos].all() == matcher.accepting  # EOS exactly where the grammar accepts
        if matcher.done:
            assert set(np.flatnonzero(allowed)) == set(eos)  # only EOS once complete
            return out
        token = int(np.argmax(logits))
        if token in tok.eos_token_ids:
            return out
        matcher.advance(token)
        out.append(token)
    raise AssertionError(f"no end after {TOKEN_CAP} tokens: {tok.decode(out)!r}")


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_sequences_satisfy_schema(tok, closers, name):
    schema = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    grammar = compile_response_format(response_format, tok)
    rng = np.random.default_rng(sorted(SCHEMAS).index(name))
    for _ in range(SEQUENCES):
        text = tok.decode(sample_sequence(tok, grammar, rng, closers))
        jsonschema.validate(json.loads(text), schema)


def test_random_sequences_json_object(tok, closers):
    grammar = compile_response_format({"type": "json_object"}, tok)
    rng = np.random.default_rng(100)
    depths = []
    for _ in range(3 * SEQUENCES):
        value = json.loads(tok.decode(sample_sequence(tok, grammar, rng, closers)))
        assert isinstance(value, dict)
        depths.append(_depth(value))
    assert max(depths) >= 2  # values other than scalars were drawn too


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def test_tool_arguments_and_tool_call(tok, closers):
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    }
    ticket = {
        "type": "function",
        "function": {
            "name": "open_ticket",
            "parameters": {
                "$defs": {"level": {"enum": ["low", "high"]}},
                "type": "object",
                "properties": {"title": {"type": "string"}, "level": {"$ref": "#/$defs/level"}},
                "required": ["title", "level"],
                "additionalProperties": False,
            },
        },
    }
    rng = np.random.default_rng(7)
    arguments = compile_tool_arguments(weather, tok)
    for _ in range(SEQUENCES):
        args = json.loads(tok.decode(sample_sequence(tok, arguments, rng, closers)))
        jsonschema.validate(args, weather["function"]["parameters"])
    call = compile_tool_call([weather, ticket], tok)
    names = set()
    for _ in range(2 * SEQUENCES):
        value = json.loads(tok.decode(sample_sequence(tok, call, rng, closers)))
        tool = {"get_weather": weather, "open_ticket": ticket}[value["name"]]
        jsonschema.validate(value["arguments"], tool["function"]["parameters"])
        names.add(value["name"])
    assert names == {"get_weather", "open_ticket"}


def test_valid_documents_replay_to_done(tok):
    """The tokenization of a valid document is allowed token by token, and ends the grammar."""
    schema = SCHEMAS["required_and_refs"]
    doc = {"id": 7, "items": [{"sku": "ABC-123", "qty": 2, "note": None}], "comment": "café ok"}
    texts = [json.dumps(doc), json.dumps(doc, indent=2), json.dumps(doc, separators=(",", ":"))]
    texts.append(json.dumps(doc, ensure_ascii=False))  # "café" as UTF-8, above as "caf\u00e9"
    for k, text in enumerate(texts):
        matcher = compile_schema(schema, tok).matcher()
        for token in tok.encode(text, add_special_tokens=False):
            if k % 2:  # also advanced without asking for the mask first
                assert matcher.allowed()[token]
            matcher.advance(token)
        assert matcher.done and matcher.accepting


def test_eos_ends_an_accepting_grammar(tok):
    """A top-level number can always grow: EOS is allowed once it is whole, and ends it."""
    matcher = compile_schema({"type": "integer"}, tok).matcher()
    eos = min(tok.eos_token_ids)
    assert not matcher.allowed()[eos] and not matcher.accepting
    for token in tok.encode("42", add_special_tokens=False):
        matcher.advance(token)
    assert matcher.accepting and not matcher.done and matcher.allowed()[eos]
    matcher.advance(eos)
    assert matcher.done


@pytest.mark.parametrize(
    "schema, fragment",
    [
        ({"type": "strin"}, "strin"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),  # a multi-line library message
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
        ({"anyOf": []}, "anyOf"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ([1, 2], "list"),
    ],
)
def test_invalid_schema_is_a_one_line_error(tok, schema, fragment):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "bad", "schema": schema, "strict": True},
    }
    with pytest.raises(SchemaError) as info:
        compile_response_format(response_format, tok)
    err = info.value
    assert isinstance(err, MerError) and isinstance(err, ParamError)
    message = str(err)
    assert "\n" not in message and fragment in message
    assert err.name == "response_format.json_schema.schema"
    assert message.startswith("response_format.json_schema.schema ")


def test_invalid_requests(tok):
    cases = [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"schema": {}}},
            "response_format.json_schema.name",
        ),
        ("json", "response_format"),
    ]
    for response_format, name in cases:
        with pytest.raises(SchemaError) as info:
            compile_response_format(response_format, tok)
        assert info.value.name == name and "\n" not in str(info.value)
    with pytest.raises(SchemaError, match="tools"):
        compile_tool_arguments({"type": "function", "function": {"parameters": {}}}, tok)
    with pytest.raises(SchemaError, match=r"tools\[f\].function.parameters .*strin"):
        compile_tool_arguments({"name": "f", "parameters": {"type": "strin"}}, tok)


def test_not_strict_ignores_what_it_cannot_enforce(tok):
    schema = {"type": "string", "format": "no-such-format"}
    spec = {"name": "loose", "schema": schema}  # strict absent: best effort
    grammar = compile_response_format({"type": "json_schema", "json_schema": spec}, tok)
    assert grammar is not None
    assert compile_response_format({"type": "text"}, tok) is None


def test_mask_disallows_ids_past_the_vocabulary(tok):
    grammar = compile_response_format({"type": "json_object"}, tok)
    matcher = grammar.matcher()
    logits = np.zeros(tok.vocab_size + EXTRA_IDS, np.float32)
    matcher.mask_logits(logits)
    assert np.isneginf(logits[tok.vocab_size :]).all()
    allowed = np.flatnonzero(np.isfinite(logits))
    assert len(allowed) and allowed.max() < tok.vocab_size
    assert (allowed == np.flatnonzero(matcher.allowed())).all()
    for token in (tok.vocab_size, tok.vocab_size + EXTRA_IDS - 1, -1):
        with pytest.raises(StructuredOutputError):
            matcher.advance(token)
    brace = tok.encode("{", add_special_tokens=False)[0]
    matcher.advance(brace)  # the failed advances left it where it was


def test_disallowed_token_is_refused(tok):
    matcher = compile_response_format({"type": "json_object"}, tok).matcher()
    letter = tok.encode("x", add_special_tokens=False)[0]
    brace = tok.encode("{", add_special_tokens=False)[0]
    eos = min(tok.eos_token_ids)
    for masked in (False, True):  # checked against this step's mask, or without one
        if masked:
            assert not matcher.allowed()[letter] and not matcher.allowed()[eos]
        for token in (letter, eos):
            with pytest.raises(StructuredOutputError, match="not allowed"):
                matcher.advance(token)
    matcher.advance(brace)  # the refusals left it usable, where it was
    assert matcher.allowed()[tok.encode("}", add_special_tokens=False)[0]]


def test_compiled_once_and_matchers_independent(tok):
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": SCHEMAS["enums"]},
    }
    first = compile_response_format(response_format, tok)
    assert compile_response_format(json.loads(json.dumps(response_format)), tok) is first
    a, b = first.matcher(), first.matcher()
    for token in tok.encode('{"color": "red"', add_special_tokens=False):
        a.advance(token)
    brace = tok.encode("{", add_special_tokens=False)[0]
    comma = tok.encode(",", add_special_tokens=False)[0]
    assert a.allowed()[comma] and not a.allowed()[brace]  # after "red": only , or whitespace
    assert b.allowed()[brace] and not b.allowed()[comma]  # b is still at the start
    assert np.array_equal(first.matcher().allowed(), b.allowed())


def test_token_bytes_match_decoding(tok):
    tokens, special = token_bytes(tok)
    assert len(tokens) == tok.vocab_size
    assert set(special) >= set(tok.eos_token_ids)
    checked = 0
    for i in range(0, tok.vocab_size, 7):
        if i in special:
            continue
        try:
            text = tokens[i].decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a character: decode() would show U+FFFD
        assert tok.decode([i]) == text, i
        checked += 1
    assert checked > 5000
    assert b"".join(tokens[i] for i in tok.encode('{"k": "v"}', add_special_tokens=False)) == (
        b'{"k": "v"}'
    )
