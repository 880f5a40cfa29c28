"""GET /openapi.json: the API as OpenAPI 3.0, written from what mer/http/openai.py accepts
(the same names, types and ranges), so that a client generator or a fuzzer (schemathesis, in
the tests) sees exactly the contract the server keeps: every status it can answer with and
the shape of every body."""

from __future__ import annotations

from mer.http.openai import MAX_N, MAX_STOP, RESERVED_TEMPLATE_VARS, Limits
from mer.sampling import MAX_LOGPROBS


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*statuses: int) -> dict:
    text = {
        400: "The request is malformed or names an unsupported field",
        401: "A missing or wrong API key",
        404: "An unknown model",
        413: "The body is over the size limit",
        429: "The admission queue is full (see Retry-After)",
        503: "The model is loading, or the service is shutting down",
    }
    return {
        str(s): {
            "description": text[s],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        for s in statuses
    }


def openapi(model: str, limits: Limits | None = None) -> dict:
    max_tokens = {"type": "integer", "minimum": 0, "nullable": True}
    if limits is not None:
        max_tokens["maximum"] = limits.max_tokens
    stop = {
        "nullable": True,
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP},
        ],
    }
    sampling = {
        "model": {"type": "string", "nullable": True, "enum": [model]},
        "max_tokens": max_tokens,
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "nullable": True},
        "top_p": {
            "type": "number",
            "exclusiveMinimum": True,
            "minimum": 0,
            "maximum": 1,
            "nullable": True,
        },  # fmt: skip
        "top_k": {"type": "integer", "minimum": -1, "nullable": True},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
        "seed": {"type": "integer", "nullable": True},
        "stop": stop,
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "nullable": True},
        "stream": {"type": "boolean", "nullable": True},
        "stream_options": {
            "type": "object",
            "nullable": True,
            "properties": {"include_usage": {"type": "boolean"}},
            "additionalProperties": False,
        },
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
        "repetition_penalty": {
            "type": "number",
            "minimum": 0.01,
            "maximum": 10,
            "nullable": True,
        },  # fmt: skip
        "logit_bias": {
            "type": "object",
            "nullable": True,
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
        "user": {"type": "string", "nullable": True},
        "ignore_eos": {"type": "boolean", "nullable": True},
        "return_token_ids": {"type": "boolean", "nullable": True},
        "response_format": {
            "nullable": True,
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
                "json_schema": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "schema": {"type": "object"},
                        "strict": {"type": "boolean", "nullable": True},
                        "description": {"type": "string"},
                    },
                },
            },
        },
    }
    content_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": content_part}]},
            "name": {"type": "string"},
        },
        "additionalProperties": False,
    }
    function = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "description": {"type": "string"},
            "parameters": {"type": "object"},
        },
    }
    chat_request = {
        "type": "object",
        "required": ["messages"],
        "additionalProperties": False,
        "properties": {
            **sampling,
            "messages": {"type": "array", "minItems": 1, "items": message},
            "max_completion_tokens": max_tokens,
            "logprobs": {"type": "boolean", "nullable": True},
            "top_logprobs": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_LOGPROBS,
                "nullable": True,
            },  # fmt: skip
            "tools": {
                "type": "array",
                "nullable": True,
                "items": {
                    "type": "object",
                    "required": ["type", "function"],
                    "properties": {
                        "type": {"type": "string", "enum": ["function"]},
                        "function": function,
                    },
                },
            },
            "tool_choice": {
                "nullable": True,
                "oneOf": [
                    {"type": "string", "enum": ["none", "auto", "required"]},
                    {
                        "type": "object",
                        "required": ["type", "function"],
                        "properties": {
                            "type": {"type": "string", "enum": ["function"]},
                            "function": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}},
                            },
                        },
                    },
                ],
            },
            "parallel_tool_calls": {"type": "boolean", "nullable": True},
            "chat_template_kwargs": {
                "type": "object",
                "nullable": True,
                "description": "further chat-template variables, e.g. enable_thinking",
                "not": {"anyOf": [{"required": [name]} for name in sorted(RESERVED_TEMPLATE_VARS)]},
            },
        },
    }
    completion_request = {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            **sampling,
            "prompt": {
                "oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                ]
            },
            "logprobs": {"type": "integer", "minimum": 0, "maximum": 5, "nullable": True},
        },
    }
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
            "prompt_tokens_details": {
                "type": "object",
                "properties": {"cached_tokens": {"type": "integer"}},
            },
        },
    }
    finish = {"type": "string", "nullable": True, "enum": ["stop", "length", "tool_calls", None]}
    tool_call = {
        "type": "object",
        "required": ["id", "type", "function"],
        "properties": {
            "id": {"type": "string"},
            "type": {"type": "string", "enum": ["function"]},
            "function": {
                "type": "object",
                "required": ["name", "arguments"],
                "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
            },
        },
    }
    chat_response = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["chat.completion"]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "usage": usage,
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "finish_reason": finish,
                        "logprobs": {"type": "object", "nullable": True},
                        "message": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {
                                "role": {"type": "string", "enum": ["assistant"]},
                                "content": {"type": "string", "nullable": True},
                                "tool_calls": {"type": "array", "items": tool_call},
                            },
                        },
                    },
                },
            },
        },
    }
    completion_response = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["text_completion"]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "usage": usage,
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "text", "finish_reason"],
                    "properties": {
                        "index": {"type": "integer"},
                        "text": {"type": "string"},
                        "finish_reason": finish,
                        "logprobs": {"type": "object", "nullable": True},
                    },
                },
            },
        },
    }
    model_card = {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["model"]},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "max_model_len": {"type": "integer"},
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": "string", "nullable": True},
                    "code": {"type": "string", "nullable": True},
                },
            }
        },
    }
    generation_errors = _errors(400, 401, 404, 413, 429, 503)

    def post(summary: str, request: str, response: str) -> dict:
        return {
            "post": {
                "summary": summary,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(request)}},
                },
                "responses": {
                    "200": {
                        "description": "The completion, or with stream: server-sent events",
                        "content": {
                            "application/json": {"schema": _ref(response)},
                            "text/event-stream": {
                                "schema": {
                                    "type": "object",
                                    "required": ["data"],
                                    "properties": {
                                        "data": {"type": "string"},
                                        "event": {"type": "string"},
                                    },
                                }
                            },
                        },
                    },
                    **generation_errors,
                },
            }
        }

    return {
        "openapi": "3.0.3",
        "info": {"title": "mer", "version": "1", "description": f"Serving {model}"},
        "paths": {
            "/v1/chat/completions": post("A chat completion", "ChatRequest", "ChatCompletion"),
            "/v1/completions": post("A text completion", "CompletionRequest", "Completion"),
            "/v1/models": {
                "get": {
                    "summary": "The served model",
                    "responses": {
                        "200": {
                            "description": "A list of one model",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["object", "data"],
                                        "properties": {
                                            "object": {"type": "string", "enum": ["list"]},
                                            "data": {"type": "array", "items": _ref("Model")},
                                        },
                                    }
                                }
                            },
                        },
                        **_errors(401),
                    },
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model",
                    "parameters": [
                        {
                            "name": "model",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },  # fmt: skip
                    ],
                    "responses": {
                        "200": {
                            "description": "The model",
                            "content": {"application/json": {"schema": _ref("Model")}},
                        },
                        **_errors(401, 404),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "The api process is up",
                    "responses": {"200": {"description": "Up"}},
                }
            },
        },
        "components": {
            "schemas": {
                "ChatRequest": chat_request,
                "CompletionRequest": completion_request,
                "ChatCompletion": chat_response,
                "Completion": completion_response,
                "Model": model_card,
                "Error": error,
            }
        },
    }
