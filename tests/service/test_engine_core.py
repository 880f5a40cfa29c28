"""The engine actor's core with a real model, no sockets: requests in, tokens out, resume after
a restart with the same tokens, cancel, rejections."""

from __future__ import annotations

import pytest

import mer
from mer.actors.engine import EngineCore
from mer.engine.engine import Engine
from mer.models.sources import bundled_models
from mer.protocol import Cancel, Hello, Message, Rejected, Submit, Tokens


@pytest.fixture(scope="module")
def model():
    path = bundled_models()[0].path
    if path is None:
        pytest.skip("the bundled model is not installed")
    return mer.load_model(path)


def msg(body, inc="api-1"):
    return Message(body.KIND, "api.0", inc, 1, None, body)


def run(core: EngineCore) -> dict[str, list[Tokens]]:
    out: dict[str, list] = {}
    while core.engine.has_work():
        for _, body in core.step():
            out.setdefault(body.request, []).append(body)
    return out


def ids_of(bodies) -> list[int]:
    return [i for b in bodies for i in b.ids]


def test_requests_batch_and_resume_with_the_same_tokens(model):
    prompt = model.tokenizer.encode("Once upon a time, in a small village by the sea,")
    params = {"temperature": 0.9, "seed": 11, "top_p": 1.0}
    core = EngineCore(Engine(model))
    for rid in ("a", "b", "c"):
        core.handle(b"p", msg(Submit(rid, prompt, {**params, "seed": ord(rid)}, 20, [])))
    full = run(core)
    assert all(full[r][-1].finish_reason == "length" for r in "abc")
    a = ids_of(full["a"])
    assert len(a) == 20 and a != ids_of(full["b"])
    # the engine restarts after 7 tokens of "a": a new core, the api replays with resume_ids
    again = EngineCore(Engine(model))
    again.handle(b"p", msg(Submit("a", prompt, {**params, "seed": ord("a")}, 20, [], [], a[:7])))
    assert ids_of(run(again)["a"]) == a[7:]


def test_cancel_and_a_new_api_incarnation_abort(model):
    prompt = model.tokenizer.encode("Hello")
    core = EngineCore(Engine(model))
    core.handle(b"p", msg(Submit("x", prompt, {"temperature": 0}, 50, [])))
    core.handle(b"p", msg(Submit("y", prompt, {"temperature": 0}, 50, [])))
    core.step()
    core.handle(b"p", msg(Cancel("x")))
    assert "x" not in core.requests and "y" in core.requests
    assert core.handle(b"p", msg(Hello("api"), inc="api-2")) == [(b"p", Hello("engine"))]
    assert core.requests == {} and not core.engine.has_work()


@pytest.mark.parametrize(
    "params, prompt_len, status",
    [({"top_p": 2.0}, 4, 400), ({"bogus": 1}, 4, 400), ({}, 100_000, 400)],
)
def test_rejections(model, params, prompt_len, status):
    core = EngineCore(Engine(model))
    out = core.handle(b"p", msg(Submit("r", [1] * prompt_len, params, 5, [])))
    assert len(out) == 1 and isinstance(out[0][1], Rejected) and out[0][1].status == status


def test_draining_refuses_new_requests(model):
    core = EngineCore(Engine(model))
    core.draining = True
    ((_, body),) = core.handle(b"p", msg(Submit("r", [1, 2], {}, 5, [])))
    assert isinstance(body, Rejected) and body.status == 503
