"""`mer serve` as real processes, driven with the official openai client: the same tokens as
`mer generate`, restarts that lose no request, drain, reload, systemd notifications, and
nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.service.conftest import (
    generate_json,
    mer_processes,
    served_model,
    stream_completion,
)
from tests.support.cli import shm_segments, wait_for

PROMPT = "The river ran quietly past the old mill, and the children"


WORKERS = "[compute]\nmin_work = 0\nmeasured = false\nround_timeout_s = 2.0\n"  # all on workers


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_tokens_equal_mer_generate(service_factory, small_store, workers):
    """A quarter of the experts cached (cache and io actors), every product striped over
    1, 2 or 3 compute workers: the tokens of `mer generate`, greedy and sampled."""
    from openai import OpenAI

    # at 2 workers the engine also measures where each product runs best and moves it
    # between itself and the workers (probing both): the tokens must not notice
    config = WORKERS.replace("measured = false", "measured = true") if workers == 2 else WORKERS
    service = service_factory(config, args=("--compute", str(workers)))
    status = service.wait_ready()
    kinds = sorted(a["kind"] for a in status["actors"])
    assert kinds == sorted(["api", "cache", "engine", "io"] + ["compute"] * workers)
    for temperature, seed in ((0.0, 1), (0.9, 7)):
        ref = generate_json(small_store, PROMPT, 24, seed, temperature)
        ids, text, finish = stream_completion(service.url, PROMPT, 24, seed, temperature)
        assert ids == ref["token_ids"] and text == ref["text"]
        assert finish == ("length" if ref["finish_reason"] != "stop" else "stop")
    client = OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(
        model=served_model(client),
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        seed=1,
        extra_body={"return_token_ids": True},
    )
    assert whole.choices[0].text == generate_json(small_store, PROMPT, 24, 1)["text"]
    assert whole.usage.completion_tokens == 24

    # the engine's timers (bench/pipeline.py's orchestration share): every step inside the
    # work it was part of, every round over the workers counted
    def written() -> dict | None:  # the engine writes them once its work is done
        path = next((service.tmp / "run").glob("run.*/engine-timers.json"), None)
        timers = json.loads(path.read_text()) if path else {}
        return timers if timers.get("steps", 0) >= 3 * 24 else None

    timers = wait_for(written, 30, "the engine's timers after three requests")
    assert 0 < timers["step_s"] <= timers["work_s"]
    assert timers["board_rounds"] > 0 and timers["board_overhead_s"] >= 0
    assert 0 <= timers["orchestration_share"] < 1
    assert service.stop() == 0


@pytest.mark.parametrize("name", ["deepseek3-base", "gptoss-yarn-clamp"])
def test_newer_architectures_through_compute_workers(tmp_path, name):
    """A DeepSeek-V3 store (latent attention, a dense first layer, shared experts, routed
    experts streamed through the cache and io actors) with every product, the per-head
    latent ones and the shared experts included, on 2 compute workers: the tokens of
    `mer generate`. The same for gpt-oss, whose experts' biases and clamped SwiGLU the
    workers apply to their stripes."""
    from mer.store.convert import convert
    from tests.service.conftest import Service
    from tests.support.hf_models import build_model, save_model
    from tests.support.tokenizers import write_tokenizer

    hf = save_model(build_model(name, n_layers=5, seed=2), tmp_path / "hf", "f32")
    write_tokenizer(hf, "chatml")
    store = tmp_path / "store"
    convert(hf, store, quant="q8_0")
    service = Service(store, tmp_path, WORKERS, None, ("--compute", "2"))
    try:
        service.wait_ready()
        for temperature, seed in ((0.0, 1), (0.9, 7)):
            ref = generate_json(store, PROMPT, 16, seed, temperature)
            ids, text, _ = stream_completion(service.url, PROMPT, 16, seed, temperature)
            assert ids == ref["token_ids"] and text == ref["text"]
        assert service.stop() == 0
    finally:
        service.stop()


@pytest.mark.parametrize("how", ["kill -9", "SIGSTOP"])
def test_engine_dies_mid_stream_and_the_stream_goes_on(service_factory, small_store, how):
    service = service_factory()
    service.wait_ready()
    ref = generate_json(small_store, PROMPT, 120, 5, 0.9)
    engine = service.actor("engine")
    hit = []

    def strike(n: int) -> None:
        if n == 15 and not hit:
            hit.append(True)
            os.kill(engine["pid"], signal.SIGKILL if how == "kill -9" else signal.SIGSTOP)

    ids, text, _ = stream_completion(service.url, PROMPT, 120, 5, 0.9, on_chunk=strike)
    assert hit and ids == ref["token_ids"] and text == ref["text"]
    now = service.actor("engine")
    assert now["restarts"] == engine["restarts"] + 1 and now["pid"] != engine["pid"]
    if how == "SIGSTOP":
        assert "event=child_hung actor=engine.0" in service.output()


def test_compute_io_and_cache_die_mid_stream_and_the_stream_goes_on(service_factory, small_store):
    """kill -9 of a compute worker, the io actor and the cache actor, each in the middle of
    a streamed generation: the same tokens, and that actor restarted once."""
    service = service_factory(WORKERS, args=("--compute", "2"))
    service.wait_ready()
    for n, kind in enumerate(["compute", "io", "cache"]):
        ref = generate_json(small_store, PROMPT, 60, 11 + n, 0.9)
        victim = service.actor(kind)
        hit = []

        def strike(chunk: int, pid=victim["pid"], hit=hit) -> None:
            if chunk == 10 and not hit:
                hit.append(True)
                os.kill(pid, signal.SIGKILL)

        ids, text, _ = stream_completion(service.url, PROMPT, 60, 11 + n, 0.9, on_chunk=strike)
        assert hit and ids == ref["token_ids"] and text == ref["text"], kind
        wait_for(
            lambda k=kind, v=victim: service.ready() and service.actor(k)["pid"] != v["pid"],
            60,
            f"a new {kind} actor",
        )
        assert service.actor(kind)["restarts"] == victim["restarts"] + 1
    assert service.stop() == 0


def test_a_stopped_compute_worker_is_replaced(service_factory, small_store):
    """SIGSTOP of a compute worker mid-stream: found within the heartbeat timeout, its
    stripes computed by the engine, a new worker started; the same tokens."""
    service = service_factory(WORKERS, args=("--compute", "2"))
    service.wait_ready()
    ref = generate_json(small_store, PROMPT, 60, 4, 0.9)
    victim = service.actor("compute", 1)
    hit = []

    def strike(chunk: int) -> None:
        if chunk == 10 and not hit:
            hit.append(time.monotonic())
            os.kill(victim["pid"], signal.SIGSTOP)

    replaced: list[float] = []

    def watch() -> None:  # when /ready first shows the new worker
        deadline = time.monotonic() + 120
        while not replaced and time.monotonic() < deadline:
            if hit and service.ready():
                now = service.actor("compute", 1)
                if now["pid"] != victim["pid"] and now["ready"]:
                    replaced.append(time.monotonic())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    ids, _, _ = stream_completion(service.url, PROMPT, 60, 4, 0.9, on_chunk=strike)
    watcher.join()
    assert hit and ids == ref["token_ids"]
    # found by the engine's round timeout (2 s) or the heartbeat timeout (3 s), then started
    assert replaced and replaced[0] - hit[0] < 3.0 + 8
    assert service.actor("compute", 1)["restarts"] == victim["restarts"] + 1
    out = service.output()
    assert "event=child_hung actor=compute.1" in out or "event=worker_missed_round" in out


def test_sighup_changes_workers_and_cache_budget_mid_stream(service_factory, small_store):
    """SIGHUP while a generation streams: compute workers 2 -> 3 -> 1 and a cache of half
    the experts; the same tokens, and /ready shows the new counts."""
    from tests.service.conftest import cache_bytes

    service = service_factory(WORKERS + "count = 2\n")
    service.wait_ready()
    ref = generate_json(small_store, PROMPT, 90, 8, 0.9)
    half = 2 * cache_bytes(small_store)
    plan = {8: (WORKERS + "count = 3\n", None), 40: (WORKERS + "count = 1\n", half)}

    def reload(chunk: int) -> None:
        if chunk in plan:
            extra, cache = plan.pop(chunk)
            service.write_config(extra, cache)
            service.proc.send_signal(signal.SIGHUP)
            if chunk == 8:  # the third worker joins while the stream goes on
                wait_for(
                    lambda: "event=child_ready actor=compute.2" in service.output(),
                    60,
                    "a third worker",
                )

    ids, text, _ = stream_completion(service.url, PROMPT, 90, 8, 0.9, on_chunk=reload)
    assert not plan and ids == ref["token_ids"] and text == ref["text"]
    wait_for(
        lambda: [a["kind"] for a in service.ready()["actors"]].count("compute") == 1,
        30,
        "workers retired",
    )
    out = service.output()
    assert "event=child_retired actor=compute.2" in out
    assert "event=child_retired actor=compute.1" in out
    assert "event=cache_resized" in out
    assert service.stop() == 0


def test_api_dies_and_the_next_request_succeeds(service_factory, small_store):
    service = service_factory()
    service.wait_ready()
    api = service.actor("api")
    os.kill(api["pid"], signal.SIGKILL)
    wait_for(
        lambda: service.ready() and service.actor("api")["pid"] != api["pid"], 120, "a new api"
    )
    assert service.actor("api")["restarts"] == api["restarts"] + 1
    ids, _, _ = stream_completion(service.url, PROMPT, 16, 3)
    assert ids == generate_json(small_store, PROMPT, 16, 3)["token_ids"]


def test_an_actor_that_keeps_failing_escalates(small_store, tmp_path):
    """The api cannot listen (its port is taken): restarted until more than `intensity`
    restarts fall within `period_s`, then the supervisor stops everything and exits 1,
    naming it."""
    from tests.service.conftest import Service

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    service = Service(small_store, tmp_path, supervisor="intensity = 2\n", args=("--port", port))
    try:
        code = service.proc.wait(300)
    finally:
        taken.close()
    assert code == 1
    lines = [line for line in service.output().splitlines() if line.startswith("mer: error")]
    assert len(lines) == 1 and "api.0" in lines[0] and "more than 2 restarts" in lines[0]
    assert service.output().count("event=restart actor=api.0") == 2


def test_sigterm_drains(service_factory, small_store):
    import threading

    from openai import APIStatusError, OpenAI

    service = service_factory()
    service.wait_ready()
    client = OpenAI(base_url=service.url + "/v1", api_key="unused", max_retries=0)
    ref = generate_json(small_store, PROMPT, 100, 2)
    results = {}

    def long_request():
        results["ids"], _, _ = stream_completion(
            service.url,
            PROMPT,
            100,
            2,
            on_chunk=lambda n: n == 5 and service.proc.send_signal(signal.SIGTERM),
        )

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_for(lambda: "event=draining" in service.output(), 60, "the drain to begin")
    with pytest.raises(APIStatusError) as refused:
        client.completions.create(model=served_model(client), prompt="hi", max_tokens=2)
    assert refused.value.status_code == 503
    thread.join(120)
    assert results["ids"] == ref["token_ids"]
    assert service.proc.wait(60) == 0


def test_sd_notify_ready_watchdog_reload_stopping(service_factory, tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    messages: list[tuple[float, str]] = []
    done = threading.Event()

    def listen() -> None:  # as systemd does: always reading, whatever the test is waiting on
        while not done.is_set():
            try:
                messages.append((time.monotonic(), sock.recv(4096).decode()))
            except TimeoutError:
                pass

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()

    def collect(until) -> None:
        wait_for(until, 120, f"sd_notify messages; got {[m for _, m in messages][-12:]}")

    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}
    service = service_factory(env=env)
    collect(lambda: any("READY=1" in m for _, m in messages))
    assert service.ready() is not None  # READY came once everything was up
    collect(lambda: sum("WATCHDOG=1" in m for _, m in messages) >= 3)
    engine = service.actor("engine")
    replacing: list[float] = []  # when /ready polls listed a new engine, not yet ready

    def engine_ready() -> bool:
        _, body = service.get("/ready")
        new = [a for a in body.get("actors", []) if a["kind"] == "engine"]
        new = [a for a in new if a["pid"] != engine["pid"]]
        if new and not new[0]["ready"]:
            replacing.append(time.monotonic())
        return bool(new and new[0]["ready"])

    os.kill(engine["pid"], signal.SIGSTOP)
    stopped = time.monotonic()
    wait_for(engine_ready, 120, "a new engine, ready")
    back = time.monotonic()
    collect(lambda: sum("WATCHDOG=1" in m for t, m in messages if t > back) >= 3)
    beats = [t for t, m in messages if "WATCHDOG=1" in m and t > stopped]
    # beats go on until the heartbeat timeout (3 s) finds the engine hung, stop while it is
    # replaced (polls saw the new engine starting from `gone`), and come back after
    assert replacing, "no poll saw the replacement starting"
    gone = replacing[0]
    assert back - gone > 0.3, "the replacement was too quick to tell"
    assert not [t for t in beats if gone + 0.1 < t < back - 0.1], (gone, back, beats)
    assert any(t < gone for t in beats) and any(t > back for t in beats)
    before_reload = len(messages)
    service.proc.send_signal(signal.SIGHUP)
    collect(lambda: any("RELOADING=1" in m for _, m in messages[before_reload:]))
    reloading = next(
        i for i, (_, m) in enumerate(messages) if i >= before_reload and "RELOADING=1" in m
    )
    collect(lambda: any("READY=1" in m for _, m in messages[reloading + 1 :]))
    service.proc.send_signal(signal.SIGTERM)
    collect(lambda: any("STOPPING=1" in m for _, m in messages))
    assert service.proc.wait(60) == 0
    done.set()
    listener.join()


@pytest.mark.parametrize("how", ["SIGTERM", "kill -9 of the supervisor"])
def test_nothing_is_left_behind(service_factory, small_store, tmp_path, how):
    before = mer_processes()
    service = service_factory()
    status = service.wait_ready()
    pids = {a["pid"] for a in status["actors"]} | {service.proc.pid}
    run_dir = tmp_path / "run"
    if how == "SIGTERM":
        assert service.stop() == 0
    else:
        os.kill(service.proc.pid, signal.SIGKILL)
        service.proc.wait()
        wait_for(lambda: not (pids & mer_processes()), 30, "the actors to die with it")
        again = service_factory()
        again.wait_ready()
        again.stop()
    assert not (pids & mer_processes()) and mer_processes() <= before
    assert not list(Path(run_dir).glob("run.*"))
    for pid in pids:
        assert shm_segments(pid) == []


def test_systemd_unit_verifies_and_is_hardened():
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):  # .ci/run installs it: its absence there is a failure
            pytest.fail("systemd-analyze is not installed")
        pytest.skip("systemd-analyze is not installed")
    unit = Path(__file__).resolve().parents[2] / "systemd" / "mer.service"
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True
    )
    line = next(x for x in security.stdout.splitlines() if "Overall exposure level" in x)
    assert float(line.split("level for mer.service:")[1].split()[0]) <= 2.0
