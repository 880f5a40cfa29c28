"""The OpenAI-compatible API of a real `mer serve` on the bundled default model (SmolLM2,
every weight resident), driven with the official openai client and with raw HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections import Counter

import pytest

from tests.service.conftest import Service
from tests.support.cli import wait_for

KEY = "sk-test-interactive-0"
BATCH_KEY = "sk-test-batch-0000"
CONFIG = f"""[engine]
prefill_chunk = 64
max_seqs = {{max_seqs}}
[api]
max_body_bytes = 65536
max_tokens = 256
[api.keys]
"{KEY}" = "interactive"
"{BATCH_KEY}" = "batch"
[api.classes]
interactive = 3
batch = 1
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    service = Service(None, tmp, CONFIG.format(max_seqs=16), args=("--compute", "0"))
    service.wait_ready()
    yield service
    service.stop()


def client(service, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=service.url + "/v1", api_key=key, max_retries=0, timeout=300)


def post(service, path, body, key=KEY, method="POST", raw: bytes | None = None):
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(service.url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def metrics(service) -> dict:
    """/metrics parsed with prometheus-client's own parser: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body, headers = post(service, "/metrics", None, method="GET")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            out[(sample.name, labels)] = sample.value
    return out


def test_chat_and_completions_through_the_sdk(service):
    c = client(service)
    chat = c.chat.completions.create(
        model=c.models.list().data[0].id,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 12 and chat.usage.prompt_tokens > 5
    pieces, finish = [], None
    stream = c.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        pieces += [chunk.choices[0].delta.content or ""]
        finish = chunk.choices[0].finish_reason or finish
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(pieces) == chat.choices[0].message.content
        and finish == chat.choices[0].finish_reason
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chat.usage.total_tokens

    text = c.completions.create(model="", prompt="One, two, three,", max_tokens=10, temperature=0)
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="", prompt="One, two, three,", max_tokens=10, temperature=0, stream=True
        )
    )
    assert text.choices[0].text == streamed and text.object == "text_completion"


def test_stop_n_and_seeds(service):
    c = client(service)
    whole = c.completions.create(model="", prompt="One, two, three,", max_tokens=16, temperature=0)
    text = whole.choices[0].text
    cut = text[3 : 3 + 3]
    stopped = c.completions.create(
        model="", prompt="One, two, three,", max_tokens=16, temperature=0, stop=[cut]
    )
    assert stopped.choices[0].text == text[: text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"

    def sampled():
        return c.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=16,
            temperature=1.0,
            seed=1234,
            n=2,
        )

    first, again = sampled(), sampled()
    texts = [ch.message.content for ch in first.choices]
    assert [ch.index for ch in first.choices] == [0, 1] and texts[0] != texts[1]
    assert [ch.message.content for ch in again.choices] == texts
    assert 2 <= first.usage.completion_tokens <= 2 * 16


def test_logprobs_parse_with_the_sdks_types(service):
    c = client(service)
    chat = c.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    assert "".join(e.token for e in content).strip() == chat.choices[0].message.content.strip()
    legacy = c.completions.create(model="", prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and all(len(t) == 2 for t in lp.top_logprobs)


def test_logit_bias_steers(service):
    c = client(service)
    plain = c.completions.create(
        model="",
        prompt="One, two, three,",
        max_tokens=3,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    first = plain.choices[0].model_extra["token_ids"][0]
    biased = c.completions.create(
        model="",
        prompt="One, two, three,",
        max_tokens=3,
        temperature=0,
        logit_bias={str(first): -100},
        extra_body={"return_token_ids": True},
    )
    assert biased.choices[0].model_extra["token_ids"][0] != first


def test_bad_input_gets_the_right_status_and_the_next_request_works(service):
    good = {"prompt": "Hi", "max_tokens": 2}
    cases = [
        (post(service, "/v1/completions", None, raw=b'{"prompt": "Hi",'), 400),
        (post(service, "/v1/completions", {"prompt": 7}), 400),
        (post(service, "/v1/completions", {"prompt": "Hi", "max_tokens": "two"}), 400),
        (post(service, "/v1/completions", {"prompt": "Hi", "model": "gpt-9"}), 404),
        (post(service, "/v1/models/gpt-9", None, method="GET"), 404),
        (post(service, "/v1/completions", {"prompt": "Hi " * 9000, "max_tokens": 1}), 400),
        (post(service, "/v1/completions", None, raw=b" " * 70000), 413),
        (post(service, "/v1/completions", good, key=None), 401),
        (post(service, "/v1/completions", good, key="sk-wrong-key-000"), 401),
        (post(service, "/v1/completions", {**good, "suffix": "x"}), 400),
        (post(service, "/v1/chat/completions", {"messages": "hi"}), 400),
        (post(service, "/v1/completions", {**good, "max_tokens": 1000}), 400),
        (post(service, "/v1/nope", good), 404),
    ]
    for (status, body, _), want in cases:
        assert status == want, body
        error = json.loads(body)["error"]
        assert error["message"] and "\n" not in error["message"] and error["type"]
        again, answer, _ = post(service, "/v1/completions", good)
        assert again == 200 and json.loads(answer)["choices"][0]["text"] is not None


def test_models_and_openapi(service):
    status, body, _ = post(service, "/v1/models", None, method="GET")
    card = json.loads(body)["data"][0]
    assert status == 200 and card["object"] == "model" and card["max_model_len"] > 0
    status, body, _ = post(service, f"/v1/models/{card['id']}", None, method="GET")
    assert status == 200 and json.loads(body)["id"] == card["id"]
    status, body, _ = post(service, "/openapi.json", None, method="GET", key=None)
    spec = json.loads(body)
    assert status == 200 and {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(
        spec["paths"]
    )


def test_eight_concurrent_greedy_streams_each_get_their_tokens_alone(service):
    c = client(service)
    prompts = [f"Count from {i} to {i + 9}:" for i in range(8)]

    def run(prompt):
        return (
            c.completions.create(
                model="",
                prompt=prompt,
                max_tokens=24,
                temperature=0,
                extra_body={"return_token_ids": True},
            )
            .choices[0]
            .model_extra["token_ids"]
        )

    alone = [run(p) for p in prompts]
    together = [None] * 8

    def worker(i):
        together[i] = run(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_metrics_count_exactly(service):
    c = client(service)
    before = metrics(service)
    prompts = ["a b c", "The quick brown fox"]
    expected_prompt = expected_gen = 0
    for prompt in prompts:
        r = c.completions.create(
            model="",
            prompt=prompt,
            max_tokens=5,
            temperature=0,
            n=2,
            extra_body={"ignore_eos": True},
        )
        expected_prompt += r.usage.prompt_tokens
        expected_gen += r.usage.completion_tokens
    assert expected_gen == 2 * 2 * 5
    after = metrics(service)

    def moved(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("mer:prompt_tokens_total") == expected_prompt
    assert moved("mer:generation_tokens_total") == expected_gen
    assert moved("mer:request_success_total", (("finished_reason", "length"),)) == 4
    assert moved("mer:time_to_first_token_seconds_count") == 2
    assert moved("mer:e2e_request_latency_seconds_count") == 2
    assert moved("mer:request_queue_time_seconds_count") == 2
    assert moved("mer:inter_token_latency_seconds_count") == 2 * 2 * 4
    assert after[("mer:num_requests_running", ())] == 0
    assert after[("mer:kv_cache_reserved_tokens", ())] == 0
    assert after[("mer:actor_restarts_total", (("kind", "engine"),))] == 0
    assert ("mer:prefix_cache_queries_total", ()) in after


def _raw_stream(service, body, read_bytes: int) -> socket.socket:
    """Start a streamed request on a bare socket, read `read_bytes` of the answer, and
    return the socket (closing it is the client going away)."""
    host, port = "127.0.0.1", service.port
    data = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection((host, port))
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    got = b""
    while len(got) < read_bytes:
        got += sock.recv(4096)
    return sock


def test_a_client_that_goes_away_stops_its_generation(service):
    for when, body, read in (
        ("mid-stream", {"prompt": "Once upon a time", "max_tokens": 250, "ignore_eos": True}, 2000),
        ("during prefill", {"prompt": "word " * 1000, "max_tokens": 5}, 1),
    ):
        before = metrics(service)
        sock = _raw_stream(service, body, read) if read > 1 else None
        if sock is None:  # nothing comes back before the prefill ends: just wait a little
            sock = _raw_stream(service, body, 0)
            wait_for(lambda: metrics(service)[("mer:num_requests_running", ())] == 1, 30, "running")
        sock.close()
        after = wait_for(
            lambda: (m := metrics(service))[("mer:num_requests_running", ())] == 0 and m,
            10,
            f"the generation to stop ({when})",
        )
        assert after[("mer:kv_cache_reserved_tokens", ())] == 0, when
        assert (
            after[("mer:request_cancelled_total", ())]
            - before.get(("mer:request_cancelled_total", ()), 0)
            == 1
        ), when
        generated = after[("mer:generation_tokens_total", ())] - before.get(
            ("mer:generation_tokens_total", ()), 0
        )
        assert generated < body["max_tokens"], when


def test_classes_weighted_3_to_1_are_admitted_3_to_1(tmp_path):
    """One place in the engine and a backlog of both classes: they start 3:1."""
    service = Service(None, tmp_path, CONFIG.format(max_seqs=1), args=("--compute", "0"))
    try:
        service.wait_ready()
        done: list[tuple[float, str]] = []
        lock = threading.Lock()

        def ask(key, cls):
            status, _, _ = post(
                service,
                "/v1/completions",
                {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True},
                key=key,
            )
            assert status == 200
            with lock:
                done.append((time.monotonic(), cls))

        blocker = threading.Thread(
            target=post,
            args=(
                service,
                "/v1/completions",
                {"prompt": "Hi", "max_tokens": 200, "ignore_eos": True},
            ),
        )
        blocker.start()  # holds the one place while the backlog builds
        time.sleep(1.0)
        threads = [
            threading.Thread(target=ask, args=(key, cls))
            for _ in range(40)
            for key, cls in ((KEY, "a"), (BATCH_KEY, "b"))
        ]
        for t in threads:
            t.start()
            time.sleep(0.005)
        for t in threads + [blocker]:
            t.join()
        done.sort()
        # while both classes wait: the first 40 to finish after the blocker
        first = Counter(cls for _, cls in done[:40])
        assert 3 * 0.85 <= first["a"] / first["b"] <= 3 * 1.15, first
    finally:
        service.stop()


def test_a_shared_system_prompt_is_computed_once(service):
    """Two chats sharing a ~500-token system prompt: the second finds it in the prefix cache
    (its time to first token a fraction of the first's) and gives the tokens a run without
    the cache gives."""
    from mer.model import load_model
    from mer.models.sources import resolve_model
    from mer.sampling import SamplingParams

    system = "You are a careful assistant. " + " ".join(
        f"Rule {i}: answer plainly and check each fact twice." for i in range(50)
    )
    c = client(service)

    def ask(question):
        start, first, text, usage = time.monotonic(), None, "", None
        for chunk in c.chat.completions.create(
            model="",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.monotonic() - start
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
            usage = chunk.usage or usage
        return first, text, usage

    ttft_1, _, usage_1 = ask("What is two plus two?")
    ttft_2, text_2, usage_2 = ask("Name a colour.")
    assert usage_1.prompt_tokens > 500
    assert usage_2.prompt_tokens_details.cached_tokens >= usage_1.prompt_tokens - 32
    assert ttft_2 <= 0.3 * ttft_1, (ttft_1, ttft_2)
    model = load_model(resolve_model(None))  # no prefix cache in Model.generate
    prompt = model.tokenizer.encode_chat(
        [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    )
    alone = list(model.generate(prompt, SamplingParams(temperature=0), max_tokens=12))
    assert model.tokenizer.decode(alone) == text_2


SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "shopping": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "what": {"type": "string", "maxLength": 15},
                        "kind": {"enum": ["fruit", "vegetable", "bread"]},
                        "count": {"type": "number"},
                    },
                    "required": ["what", "kind", "count"],
                    "additionalProperties": False,
                },
            },
            "urgent": {"type": "boolean"},
        },
        "required": ["items", "urgent"],
        "additionalProperties": False,
    },
    "choice": {"enum": ["yes", "no", "maybe"]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_always_validates(service, name):
    import jsonschema

    c = client(service)
    schema = SCHEMAS[name]
    for temperature in (0.0, 1.0):
        reply = c.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": f"Give me a {name} as JSON."}],
            max_tokens=200,
            temperature=temperature,
            seed=5,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema, "strict": True},
            },
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    pieces, finish = [], None
    for chunk in c.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": 'Reply with {"answer": "yes"} as JSON.'}],
        max_tokens=200,
        temperature=0,
        stream=True,
        response_format={"type": "json_object"},
    ):
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    # any object: a model may nest without end, cut by max_tokens ("length"); when it ends
    # by itself, it is an object
    assert finish == "length" or isinstance(json.loads("".join(pieces)), dict)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 10}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def test_tool_calls_follow_the_functions_schema(service):
    import jsonschema

    c = client(service)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = c.chat.completions.create(
        model="",
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    required = c.chat.completions.create(
        model="",
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    (call,) = required.choices[0].message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    # the conversation goes on with the call and its result
    follow = c.chat.completions.create(
        model="",
        messages=[
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ],
        tools=[WEATHER, TIME],
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert follow.choices[0].message.tool_calls is None


def test_an_invalid_schema_is_a_400_naming_it(service):
    for response_format in (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
    ):
        status, body, _ = post(
            service,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "response_format": response_format},
        )
        error = json.loads(body)["error"]
        assert status == 400 and "response_format" in error["message"], error
    assert post(service, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
