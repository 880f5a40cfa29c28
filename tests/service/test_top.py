"""`mer top` against a real `mer serve`: textual's own harness (App.run_test and its pilot)
drives the dashboard while the official openai client generates; `--once` as a command.

Set MER_TOP_SCREENSHOT=FILE.svg to have the streamed-cache test save the dashboard there
mid-generation (docs/top.svg is made so)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from tests.service.conftest import Service, free_port, served_model
from tests.support.cli import assert_one_line_error, run_mer

KEY = "sk-top-test-0001"
CONFIG = f'[api.keys]\n"{KEY}" = "default"\n'


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The bundled default model as a mer store (compute workers need one), every weight
    resident, two compute workers, an API key."""
    from mer.models.sources import resolve_model

    tmp = tmp_path_factory.mktemp("top")
    store = tmp / "store"
    proc = run_mer("convert", str(resolve_model(None)), str(store))
    assert proc.returncode == 0, proc.stderr
    service = Service(None, tmp, CONFIG, args=("--compute", "2", "--model", str(store)))
    service.wait_ready()
    yield service
    service.stop()


def generate_in_background(url: str, key: str | None, max_tokens: int, n: int = 1) -> list:
    """`n` streamed completions in threads; returns the threads (join them) and fills their
    results with (token count, finish reason) or the error."""
    from openai import OpenAI

    results: list = []

    def one(seed: int) -> None:
        client = OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=300)
        try:
            stream = client.completions.create(
                model=served_model(client),
                prompt="The history of the river begins",
                max_tokens=max_tokens,
                temperature=0.8,
                seed=seed,
                stream=True,
                extra_body={"ignore_eos": True},  # every completion runs to max_tokens
            )
            chunks, finish = 0, None
            for chunk in stream:
                chunks += 1
                finish = chunk.choices[0].finish_reason or finish
            results.append((chunks, finish))
        except Exception as err:  # reported by the test that joins
            results.append(err)

    threads = [threading.Thread(target=one, args=(seed,), daemon=True) for seed in range(n)]
    for t in threads:
        t.start()
    return [threads, results]


async def until(pilot, condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_once_has_every_section(service):
    from mer.top.monitor import SECTIONS

    proc = run_mer("top", "--once", "--url", service.url, "--api-key", KEY, "--interval", "0.3")
    assert proc.returncode == 0, proc.stderr
    for name in SECTIONS:
        assert f"== {name}" in proc.stdout, proc.stdout
    for actor in ("api.0", "engine.0", "compute.0", "compute.1"):
        assert actor in proc.stdout
    assert "every weight is resident" in proc.stdout and "state serving" in proc.stdout


def test_once_says_in_one_line_what_is_wrong(service):
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(run_mer("top", "--once", "--url", url), "no service answers at", code=1)
    no_key = run_mer("top", "--once", "--url", service.url, env={**os.environ, "MER_API_KEY": ""})
    assert_one_line_error(no_key, "401", "--api-key KEY", code=1)
    wrong = run_mer("top", "--once", "--url", service.url, "--api-key", "sk-not-a-key")
    assert_one_line_error(wrong, "refused the API key (401)", code=1)
    assert_one_line_error(run_mer("top", "--interval", "0"), "--interval", code=2)


def test_dashboard_waits_for_a_service_and_names_a_refused_key(service):
    from mer.top.app import TopApp

    async def drive(url, key, needle):
        app = TopApp(url, key, interval=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.problem, 10, "the waiting screen")
            assert needle in app.problem and app.view is None
            assert not app.query_one("#main").display and app.query_one("#waiting").display
            await pilot.press("q")
        assert app.return_code in (0, None)

    asyncio.run(drive(f"http://127.0.0.1:{free_port()}", None, "no service answers at"))
    asyncio.run(drive(service.url, "sk-wrong-key-0", "401"))


def test_dashboard_follows_generation_and_shows_a_compute_restart(service):
    from mer.top.app import TopApp

    async def drive():
        app = TopApp(service.url, KEY, interval=0.25)
        async with app.run_test(size=(130, 50)) as pilot:
            await until(pilot, lambda: app.view is not None, 15, "a first sample")
            _, body = service.get("/ready")
            actors = app.panel_text("actors")
            for a in body["actors"]:
                assert f"{a['kind']}.{a['index']}" in actors and str(a["pid"]) in actors
            threads, results = generate_in_background(service.url, KEY, 200, n=2)
            seen: set[str] = set()

            def moving() -> bool:
                v = app.view
                if v.generation_tps and v.running:
                    seen.add(app.panel_text("requests"))
                return len(seen) >= 3

            await until(pilot, moving, 120, "tokens/s on screen to move")
            assert any(" tok/s" in text and "generation -" not in text for text in seen)
            assert "KV cache" in app.panel_text("memory")
            for t in threads:
                t.join(300)
            assert [r[1] for r in results] == ["length", "length"], results

            compute = service.actor("compute", 0)
            os.kill(compute["pid"], signal.SIGKILL)
            killed = time.monotonic()
            await until(pilot, lambda: "RESTARTED" in app.panel_text("actors"), 15, "the restart")
            assert time.monotonic() - killed < 15
            [row] = [a for a in app.view.actors if (a.kind, a.index) == ("compute", 0)]
            assert row.restarts == compute["restarts"] + 1 and row.pid != compute["pid"]

            # the api itself restarts: the dashboard waits, then follows the new one
            api = service.actor("api", 0)
            os.kill(api["pid"], signal.SIGKILL)
            await until(
                pilot,
                lambda: (
                    any(
                        (a.kind, a.restarts) == ("api", api["restarts"] + 1)
                        for a in app.view.actors
                    )
                    and app.problem is None
                ),
                30,
                "the new api in the dashboard",
            )

            polls = app.polls
            await pilot.press("p")
            assert "[paused]" in app.panel_text("title")
            await pilot.pause(1.0)
            assert app.polls == polls
            await pilot.press("p", "r")
            assert not app.monitor.tps_history
            await until(pilot, lambda: app.polls > polls, 5, "polling to resume")
            await pilot.press("q")

    asyncio.run(drive())


def test_dashboard_on_a_streamed_model_shows_the_expert_cache_and_the_disk(service_factory):
    """A store streamed through a cache of a quarter of its experts; the dashboard starts
    before the service is up and waits for it."""
    from mer.top.app import TopApp

    svc = service_factory()

    async def drive():
        app = TopApp(svc.url, None, interval=0.25)
        problems: set[str] = set()
        async with app.run_test(size=(130, 50)) as pilot:

            def ready() -> bool:
                if app.problem:
                    problems.add(app.problem)
                return app.view is not None and app.view.state == "serving"

            await until(pilot, ready, 180, "the service")
            assert any("no service answers" in p for p in problems)
            threads, results = generate_in_background(svc.url, None, 48)
            layers: set[str] = set()
            reads: set[str] = set()

            def moving() -> bool:
                v = app.view
                if v.hit_rate is not None:
                    layers.add(app.panel_text("cache"))
                if v.read_gbps:
                    reads.add(app.panel_text("disk"))
                # per expert once layer 0 has used most of its 8 (which ones is the routing's)
                experts = len((v.expert_hit_rate or {}).get(0, {}))
                return len(layers) >= 3 and reads and experts >= 6

            await until(pilot, moving, 120, "the cache and disk figures to move")
            cache = app.panel_text("cache")
            assert "L0" in cache and "%" in cache
            assert any("GB/s" in text and "read -" not in text for text in reads)
            assert set(app.view.expert_hit_rate[0]) <= set(range(8))  # the small shape's experts
            assert app.view.arena_slots == 16 and 0 < app.view.arena_resident <= 16
            if os.environ.get("MER_TOP_SCREENSHOT"):
                app.save_screenshot(os.environ["MER_TOP_SCREENSHOT"])
            for t in threads:
                t.join(300)
            assert results and results[0][1] == "length", results
            await pilot.press("q")

    asyncio.run(drive())
