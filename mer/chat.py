"""Render Hugging Face chat templates (Jinja2) exactly as transformers' `apply_chat_template` does.

Chat templates come from model repositories, so they are untrusted code: they run in Jinja's
immutable sandbox, with the same helpers (`raise_exception`, `strftime_now`, a JSON `tojson`,
`{% generation %}` blocks) and whitespace settings that transformers uses, so the text matches.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mer.errors import MerError

# Names a message's reasoning may be given under; templates read `reasoning_content` (or
# `thinking` for gpt-oss), so, like transformers, we fill those from whichever is present.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(MerError):
    """A chat template failed to compile or render, or rejected the conversation itself."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text; rendering is unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so templates cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _DictFactory:
    """`dict(...)` for templates without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(str(message))


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Unlike Jinja's own filter, no HTML escaping, and indent/separators are exposed.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """A copy of `value` built from plain JSON-like types, so the sandbox sees no rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must stay falsy
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: list[dict]) -> list[dict]:
    prepared = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
        # Drop None values (OpenAI clients send content=None): templates handle a missing key.
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " ".join(lines) if len(lines) > 1 else str(text).strip()


def render_template(
    template: str,
    messages: list[dict],
    *,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool,
    **extra: Any,
) -> str:
    """Render `template` for `messages` the way transformers' `apply_chat_template` does.

    `extra` holds further template variables (other special tokens, `tools`, ...). Raises
    ChatTemplateError, with a one-line message, when the template is invalid or rejects the chat.
    """
    if not messages:
        raise ChatTemplateError("cannot apply the chat template to an empty conversation")
    variables: dict[str, Any] = {"tools": None, "documents": None}
    # A token the tokenizer does not define is left undefined (renders as ""), not as "None".
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    variables.update({k: _plain(v) for k, v in extra.items()})
    variables["messages"] = _prepare_messages(messages)
    variables["add_generation_prompt"] = bool(add_generation_prompt)
    try:
        return _compile(template).render(**variables)
    except ChatTemplateError as err:
        raise ChatTemplateError(_one_line(str(err))) from None
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(
            f"chat template syntax error on line {err.lineno}: {_one_line(err.message or '')}"
        ) from None
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template error: {_one_line(str(err))}") from None
    except Exception as err:  # a template can trip any Python error, e.g. 'str' + None
        raise ChatTemplateError(
            f"chat template failed: {type(err).__name__}: {_one_line(str(err))}"
        ) from None
