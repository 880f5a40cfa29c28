"""The api's socket-free parts: OpenAI request parsing, response shapes, admission."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mer.http.admission import Admission
from mer.http.openai import (
    ApiError,
    Limits,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    parse_chat,
    parse_completion,
    parse_tool_calls,
)

LIMITS = Limits(context=64, max_tokens=48, model="m", vocab_size=100)


def encode(text: str) -> list[int]:
    return [ord(c) % 100 for c in text]


def encode_chat(messages, tools, template_kwargs=None):
    text = "".join(m["role"] + m["content"] for m in messages) + json.dumps(tools or [])
    return encode(text + json.dumps(template_kwargs or {}))


def refused(parse, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body)
    err = info.value
    assert "\n" not in err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    return err


def completion(body):
    return parse_completion(body, LIMITS, encode)


def chat(body):
    return parse_chat(body, LIMITS, encode_chat)


def test_a_completion_request_becomes_a_job():
    job = completion(
        {
            "model": "m",
            "prompt": ["ab", "cde"],
            "n": 2,
            "max_tokens": 5,
            "temperature": 0.5,
            "top_k": 3,
            "seed": -1,
            "stop": "x",
            "logit_bias": {"7": 3},
            "logprobs": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert job.prompts == [encode("ab"), encode("cde")] and job.choices == 4
    assert job.prompt_of(3) == encode("cde") and job.stop == ["x"] and job.include_usage
    assert job.params["logit_bias"] == [[7, 3.0]] and job.params["logprobs"] == 2
    assert job.params["seed"] == (1 << 63) - 1  # negative seeds are OpenAI's too
    seeds = [job.seed_of(i) for i in range(4)]
    assert seeds[0] == seeds[2] == job.params["seed"] and seeds[1] == seeds[3] != seeds[0]


def test_a_chat_request_becomes_a_job():
    job = chat(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "!"}],
                },
            ],
            "max_completion_tokens": 7,
            "logprobs": True,
            "top_logprobs": 3,
        }
    )
    assert job.prompts == [
        encode_chat(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi!"}], None
        )
    ]
    assert job.max_tokens == 7 and job.logprobs == 3 and job.tool_choice == "none"


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": "a", "best_of": 2}, 400, "best_of"),
        ({"prompt": "a", "echo": True}, 400, "echo"),
        ({"prompt": 3}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "a", "model": "other"}, 404, "model"),
        ({"prompt": "a", "max_tokens": 49}, 400, "max_tokens"),
        ({"prompt": "a" * 60, "max_tokens": 10}, 400, "max_tokens"),
        ({"prompt": "a" * 64}, 400, "messages"),
        ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "a", "temperature": 3}, 400, "temperature"),
        ({"prompt": "a", "top_p": 0}, 400, "top_p"),
        ({"prompt": "a", "n": 0}, 400, "n"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"100": 1}}, 400, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"5": 101}}, 400, "logit_bias"),
        ({"prompt": "a", "logprobs": 6}, 400, "logprobs"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"prompt": "a", "response_format": {"type": "xml"}}, 400, "response_format"),
        ({"prompt": [1, 2, 100]}, 400, "prompt"),
        ([1, 2], 400, None),
    ],
)
def test_bad_completion_fields_are_named(body, status, param):
    err = refused(completion, body)
    assert err.status == status and err.param == param
    if param:
        assert param in err.message or "context" in err.message


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "x", "audio": 1}]}, "messages[0].audio"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
            "tool_choice",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools[0]",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
    ],
)
def test_bad_chat_fields_are_named(body, param):
    assert refused(chat, body).param == param


def test_logprobs_take_openai_shapes():
    text_of = TokenText(lambda ids: "".join(chr(97 + i) for i in ids))
    scores = [[-0.1, [[0, -0.1], [1, -2.5]]], [-1.0, [[2, -0.5], [1, -1.0]]]]
    shaped = chat_logprobs([0, 1], scores, text_of)
    assert shaped["content"][1] == {
        "token": "b",
        "logprob": -1.0,
        "bytes": [98],
        "top_logprobs": [
            {"token": "c", "logprob": -0.5, "bytes": [99]},
            {"token": "b", "logprob": -1.0, "bytes": [98]},
        ],
    }
    legacy = completion_logprobs([0, 1], scores, text_of, 5)
    assert legacy == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.1, -1.0],
        "top_logprobs": [{"a": -0.1, "b": -2.5}, {"c": -0.5, "b": -1.0}],
        "text_offset": [5, 6],
    }


def test_tool_calls_are_found_in_text():
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    ids = iter(range(10))
    text = 'ok <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    calls = parse_tool_calls(text, tools, None, lambda: f"c{next(ids)}")
    assert calls == [
        {
            "id": "c0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        }
    ]
    assert parse_tool_calls("no call here", tools, None, lambda: "x") is None
    assert parse_tool_calls('{"name": "other", "arguments": {}}', tools, None, lambda: "x") is None
    forced = parse_tool_calls('{"city": "Rome"}', tools, "get_weather", lambda: "y")
    assert forced[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}


# -- admission -----------------------------------------------------------------------------------
def test_keys_map_to_classes():
    admission = Admission(4, 8, {"gold": 3}, {"sk-gold-12345": "gold", "sk-free-12345": "free"})
    assert admission.classify("Bearer sk-gold-12345") == "gold"
    assert admission.classify("bearer sk-free-12345") == "free"
    for header in (None, "", "Bearer wrong", "Basic sk-gold-12345"):
        err = pytest.raises(ApiError, admission.classify, header).value
        assert err.status == 401
    assert Admission(4, 8).classify(None) == "default"


def test_classes_weighted_3_to_1_start_3_to_1():
    admission = Admission(1, 1000, {"a": 3, "b": 1})
    for i in range(400):
        admission.offer(("a", i), "a")
        admission.offer(("b", i), "b")
    order = []
    for _ in range(400):
        (started,) = admission.admit()
        order.append(started.cls)
        admission.release(1)
    assert Counter(order) == {"a": 300, "b": 100}
    # interleaved, not in bursts: every run of four is three a and one b
    assert all(Counter(order[i : i + 4]) == {"a": 3, "b": 1} for i in range(0, 400, 4))
    # within a class, first come first served
    assert [w.item[1] for w in admission.queues["a"]] == list(range(300, 400))


def test_the_queue_is_bounded_and_places_are_counted():
    admission = Admission(capacity=3, max_waiting=2)
    admission.offer("x", "default", places=2)
    admission.offer("y", "default", places=2)
    err = pytest.raises(ApiError, admission.offer, "z", "default").value
    assert err.status == 429 and int(err.headers["Retry-After"]) >= 1
    assert [w.item for w in admission.admit()] == ["x"]  # y needs 2 of the 1 left
    assert admission.admit() == []
    admission.release(2)
    assert [w.item for w in admission.admit()] == ["y"]
    big = Admission(capacity=2, max_waiting=2)
    big.offer("n=5", "default", places=5)  # larger than the engine: starts when it is idle
    assert [w.item for w in big.admit()] == ["n=5"]


def test_a_withdrawn_request_never_starts():
    admission = Admission(1, 4)
    admission.offer("a", "default")
    admission.offer("b", "default")
    admission.offer("c", "default")
    assert [w.item for w in admission.admit()] == ["a"]
    assert admission.withdraw("b") and not admission.withdraw("b")
    admission.release(1)
    assert [w.item for w in admission.admit()] == ["c"]


def test_chat_template_kwargs_reach_the_template_and_cannot_override_the_request():
    plain = chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    flagged = chat(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "chat_template_kwargs": {"enable_thinking": False},
        }
    )
    assert flagged.prompts[0] != plain.prompts[0]
    assert flagged.prompts[0][-len(encode('{"enable_thinking": false}')) :] == encode(
        '{"enable_thinking": false}'
    )
    for value, needle in (([1], "must be an object"), ({"messages": []}, "'messages'")):
        err = refused(
            chat,
            {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "chat_template_kwargs": value,
            },
        )
        assert err.status == 400 and err.param == "chat_template_kwargs" and needle in err.message
