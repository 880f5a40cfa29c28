"""OpenAI's request and response shapes, without HTTP: a request body in, a `Job` out (or an
`ApiError` naming what is wrong); engine tokens in, completion objects and stream chunks out.

The api actor (mer/actors/api.py) is the shell around this: it reads bodies, admits jobs,
submits one engine generation per choice and writes what this module shapes.

What is accepted is exactly what is implemented: a field mer does not support is a 400 that
names it, never silently ignored. Each choice of a request is one engine generation; with a
seed, choice i draws with a seed derived from it (choice 0 with the seed itself, so a single
choice is what `mer generate --seed` gives).
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mer.sampling import MAX_LOGPROBS

MAX_STOP = 4
MAX_N = 16


class ApiError(Exception):
    """A request the api refuses: HTTP `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code=None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param} {message}", param=param)


@dataclass
class Limits:
    """What the api accepts, from its config and the model."""

    context: int  # the model's context: prompt + generated tokens
    max_tokens: int  # the most tokens one choice may ask for
    model: str  # the served model's id
    vocab_size: int  # token ids are below this


@dataclass
class Job:
    """A validated request: what to run for each choice, and how to answer."""

    kind: str  # "chat" or "completion"
    prompts: list[list[int]]  # prompt ids; completions may have several, chat one
    n: int
    params: dict[str, Any]  # SamplingParams fields for the engine
    max_tokens: int | None  # None: the rest of the context
    stop: list[str]
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # alternatives per token (None: no logprobs)
    ignore_eos: bool = False
    return_token_ids: bool = False
    response_format: dict | None = None  # json_object / json_schema, for the engine
    tools: list[dict] = field(default_factory=list)
    tool_choice: Any = "auto"
    user: str | None = None

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.n]

    def seed_of(self, index: int) -> int | None:
        """Choice `index`'s seed: the request's own for the first, one derived from it for
        each further choice (so n choices differ, and a repeat gives the same n)."""
        seed = self.params.get("seed")
        if seed is None or index % self.n == 0:
            return seed
        digest = hashlib.blake2b(f"{seed}:{index % self.n}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 2


# -- parsing -----------------------------------------------------------------------------------
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "user",
    "ignore_eos",
    "return_token_ids",
    "logprobs",
    "response_format",
}
COMPLETION_FIELDS = _COMMON | {"prompt"}
CHAT_FIELDS = _COMMON | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "chat_template_kwargs",
}
# template variables a request may not set through chat_template_kwargs
RESERVED_TEMPLATE_VARS = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token"}
)


def _number(body: dict, name: str, low: float, high: float, default: float | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad(name, f"must be a number, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise bad(name, f"must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"must be an integer, got {json.dumps(value)[:40]}")
    if value < low or (high is not None and value > high):
        raise bad(name, f"must be between {low} and {high}" if high else f"must be >= {low}")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, "must be true or false")
    return value


def _common(body: object, known: set[str], limits: Limits) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(
            400, f"{unknown[0]} is not supported by this server", param=unknown[0],
            code="unsupported_field",
        )  # fmt: skip
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "must be a string")
    if model and model != limits.model:
        raise ApiError(
            404,
            f"the model {model!r} does not exist (this server serves {limits.model!r})",
            param="model",
            code="model_not_found",
        )
    params: dict[str, Any] = {
        "temperature": _number(body, "temperature", 0.0, 2.0, 1.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, 1.0),
    }
    if params["top_p"] == 0.0:
        raise bad("top_p", "must be greater than 0")
    top_k = _integer(body, "top_k", -1, None)
    if top_k is not None and top_k > 0:
        params["top_k"] = top_k
    for name, low, high in (
        ("min_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
        ("repetition_penalty", 0.01, 10.0),
    ):
        value = _number(body, name, low, high)
        if value is not None:
            params[name] = value
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad("seed", "must be an integer")
        params["seed"] = seed % (1 << 63)  # OpenAI allows negative seeds
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad("logit_bias", "must map token ids to numbers")
        pairs = []
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise bad("logit_bias", f"has a key that is not a token id: {key!r}") from None
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise bad("logit_bias", f"of token {key} must be a number")
            if not -100 <= value <= 100:
                raise bad("logit_bias", f"of token {key} must be between -100 and 100")
            if token < 0 or token >= limits.vocab_size:
                raise bad("logit_bias", f"names token {token}, outside the vocabulary")
            pairs.append([token, float(value)])
        params["logit_bias"] = pairs
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise bad("stop", f"must be a string or a list of up to {MAX_STOP} non-empty strings")
    options = body.get("stream_options")
    stream = _boolean(body, "stream")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", "may only hold include_usage")
        if not stream:
            raise bad("stream_options", "is only allowed when stream is true")
        include_usage = _boolean(options, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "must be a string")
    return {
        "params": params,
        "n": _integer(body, "n", 1, MAX_N, 1),
        "stop": stop,
        "stream": stream,
        "include_usage": include_usage,
        "ignore_eos": _boolean(body, "ignore_eos"),
        "return_token_ids": _boolean(body, "return_token_ids"),
        "response_format": _response_format(body.get("response_format")),
        "user": user,
    }


def _response_format(value: object) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise bad("response_format", "must be an object with a type")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad("response_format", "json_schema must be an object with a name")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise bad("response_format", "json_schema.schema must be a JSON schema object")
        return {"type": "json_schema", "json_schema": {**spec, "schema": schema}}
    raise bad("response_format", f"type must be text, json_object or json_schema, not {kind!r}")


def _max_tokens(value: int | None, prompt: int, limits: Limits) -> None:
    room = limits.context - prompt
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {prompt} tokens, which leaves no room in this model's context "
            f"of {limits.context} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    if value is not None and prompt + value > limits.context:
        raise ApiError(
            400,
            f"this model's context is {limits.context} tokens; the prompt has {prompt} and "
            f"max_tokens asks for {value} more",
            param="max_tokens",
            code="context_length_exceeded",
        )


def parse_completion(body: object, limits: Limits, encode: Callable[[str], list[int]]) -> Job:
    """A POST /v1/completions body as a Job; `encode` tokenizes a prompt string."""
    common = _common(body, COMPLETION_FIELDS, limits)
    assert isinstance(body, dict)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt):
        prompts = [list(prompt)]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompt)
    ):
        prompts = [list(p) for p in prompt]
    else:
        raise bad("prompt", "must be a string, a list of strings, or token ids")
    if not all(prompts):
        raise bad("prompt", "encodes to no tokens")
    vocab = limits.vocab_size
    if any(t >= vocab for p in prompts for t in p):
        raise bad("prompt", "holds a token id outside the vocabulary")
    max_tokens = _integer(body, "max_tokens", 0, limits.max_tokens, min(16, limits.max_tokens))
    for p in prompts:
        _max_tokens(max_tokens, len(p), limits)
    logprobs = _integer(body, "logprobs", 0, 5)
    if logprobs is not None:
        common["params"]["logprobs"] = logprobs
    return Job("completion", prompts, max_tokens=max_tokens, logprobs=logprobs, **common)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def chat_messages(messages: object) -> list[dict]:
    """The messages as the chat template takes them: text content only (a string, or a list
    of text parts joined), roles checked."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, "must be an object")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"{where}.role", "must be system, developer, user, assistant or tool")
        unknown = set(message) - {"role", "content", "name", "tool_calls", "tool_call_id"}
        if unknown:
            name = sorted(unknown)[0]
            raise ApiError(
                400, f"{where}.{name} is not supported by this server", param=f"{where}.{name}"
            )
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(
                        f"{where}.content[{j}]", "must be a text part (this model reads text)"
                    )
                if not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}].text", "must be a string")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            if role != "assistant" or not message.get("tool_calls"):
                raise bad(f"{where}.content", "is required")
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{where}.content", "must be a string or a list of text parts")
        entry = {"role": "system" if role == "developer" else role, "content": content}
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                entry[key] = message[key]
        if message.get("tool_calls") is not None:
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                raise bad(f"{where}.tool_calls", "must be a list")
            entry["tool_calls"] = [_call_for_template(c, f"{where}.tool_calls") for c in calls]
        out.append(entry)
    return out


def _call_for_template(call: object, where: str) -> dict:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise bad(where, "must hold objects with a function")
    function = call["function"]
    arguments = function.get("arguments", "{}")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise bad(where, "function.arguments must be a JSON string") from None
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": function.get("name"), "arguments": parsed},
    }


def _tools(body: dict) -> tuple[list[dict], Any]:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise bad("tool_choice", "needs tools")
        return [], "none"
    if not isinstance(tools, list):
        raise bad("tools", "must be a list")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
        ):
            raise bad(f"tools[{i}]", 'must be {"type": "function", "function": {...}}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise bad(f"tools[{i}].function.name", "must be a non-empty string")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise bad(f"tools[{i}].function.parameters", "must be a JSON schema object")
        names.append(function["name"])
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        name = (
            (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        )
        if name not in names:
            raise bad("tool_choice", f"names no function among the tools: {name!r}")
        choice = {"type": "function", "function": {"name": name}}
    elif choice not in ("auto", "none", "required"):
        raise bad("tool_choice", "must be auto, none, required or a named function")
    if choice == "required" and not tools:
        raise bad("tool_choice", "required needs at least one tool")
    return tools, choice


def template_kwargs(body: dict) -> dict | None:
    """`chat_template_kwargs` (vLLM's extension): further variables for the chat template,
    e.g. {"enable_thinking": false} for Qwen3."""
    value = body.get("chat_template_kwargs")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad("chat_template_kwargs", "must be an object of template variables")
    taken = sorted(RESERVED_TEMPLATE_VARS & set(value))
    if taken:
        raise bad("chat_template_kwargs", f"cannot set {taken[0]!r}: the request sets it")
    return value


def parse_chat(
    body: object,
    limits: Limits,
    encode_chat: Callable[[list[dict], list[dict] | None, dict | None], list[int]],
) -> Job:
    """A POST /v1/chat/completions body as a Job; `encode_chat(messages, tools, kwargs)`
    renders the model's chat template and tokenizes it."""
    common = _common(body, CHAT_FIELDS, limits)
    assert isinstance(body, dict)
    messages = chat_messages(body.get("messages"))
    tools, tool_choice = _tools(body)
    if tools and tool_choice != "none" and common["response_format"] is not None:
        raise bad("response_format", "cannot be combined with tools")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("parallel_tool_calls", "must be true or false")
    prompt = encode_chat(messages, tools if tool_choice != "none" else None, template_kwargs(body))
    max_tokens = _integer(body, "max_completion_tokens", 0, limits.max_tokens)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 0, limits.max_tokens)
    _max_tokens(max_tokens, len(prompt), limits)
    logprobs = None
    if _boolean(body, "logprobs"):
        logprobs = _integer(body, "top_logprobs", 0, MAX_LOGPROBS, 0)
        common["params"]["logprobs"] = logprobs
    elif body.get("top_logprobs") is not None:
        raise bad("top_logprobs", "needs logprobs: true")
    return Job(
        "chat",
        [prompt],
        max_tokens=max_tokens,
        logprobs=logprobs,
        tools=tools,
        tool_choice=tool_choice,
        **common,
    )


# -- responses ---------------------------------------------------------------------------------
def finish_reason(reason: str | None, tool_calls: bool = False) -> str | None:
    if reason is None:
        return None
    if tool_calls:
        return "tool_calls"
    return "stop" if reason == "stop" else "length"


class TokenText:
    """A token's text and bytes as logprobs show them."""

    def __init__(self, decode: Callable[[list[int]], str], token_bytes=None) -> None:
        self._decode = decode
        self._bytes = token_bytes  # id -> bytes, when the tokenizer can tell them exactly
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            raw = self._bytes(token) if self._bytes is not None else None
            if raw is None:
                text = self._decode([token])
                raw = text.encode("utf-8")
            else:
                text = raw.decode("utf-8", errors="replace")
            hit = self._cache[token] = (text, list(raw))
        return hit


def chat_logprobs(ids: list[int], scores: list, text_of: TokenText) -> dict:
    """OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for token, (logprob, top) in zip(ids, scores, strict=False):
        text, raw = text_of(token)
        alternatives = []
        for alt, alt_logprob in top:
            alt_text, alt_raw = text_of(alt)
            alternatives.append({"token": alt_text, "logprob": alt_logprob, "bytes": alt_raw})
        content.append(
            {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alternatives}
        )
    return {"content": content, "refusal": None}


def completion_logprobs(ids: list[int], scores: list, text_of: TokenText, offset: int) -> dict:
    """OpenAI's legacy completions `logprobs`: tokens, token_logprobs, top_logprobs (one
    {token: logprob} map per position) and text_offset (from `offset`)."""
    tokens, values, tops, offsets = [], [], [], []
    for token, (logprob, top) in zip(ids, scores, strict=False):
        text, _ = text_of(token)
        tokens.append(text)
        values.append(logprob)
        tops.append({text_of(alt)[0]: alt_logprob for alt, alt_logprob in top})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def parse_tool_calls(text: str, tools: list[dict], forced: str | None, call_id: Callable[[], str]):
    """Tool calls in a generated text, as OpenAI's `tool_calls` (or None when there are none).

    `forced`: the function named by tool_choice (the text is then its arguments, generated
    under its schema). Otherwise the text is searched for calls the way chat templates ask
    models to write them: `<tool_call>{"name": .., "arguments": {..}}</tool_call>` (Hermes,
    Qwen, SmolLM), or the whole text as one such object or a list of them."""
    names = {t["function"]["name"] for t in tools}
    if forced is not None:
        return [_call(call_id(), forced, text)]
    found = []
    pieces = []
    start = text.find("<tool_call>")
    while start >= 0:
        end = text.find("</tool_call>", start)
        pieces.append(text[start + len("<tool_call>") : end if end >= 0 else len(text)])
        if end < 0:
            break
        start = text.find("<tool_call>", end)
    if not pieces:
        pieces = [text]
    for piece in pieces:
        try:
            value = json.loads(piece.strip())
        except ValueError:
            continue
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in names:
                continue
            arguments = item.get("arguments", item.get("parameters", {}))
            found.append(_call(call_id(), item["name"], json.dumps(arguments)))
    return found or None


def _call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
