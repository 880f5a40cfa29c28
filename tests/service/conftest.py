"""A real `mer serve` (supervisor, engine and api processes) on a small synthetic MoE store
streamed through a cache of a quarter of its experts."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import MER, run_mer, wait_for

QUARTER = 8 * 8 // 4  # slots: a quarter of the small shape's 64 experts


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-model")
    store = root / "store"
    proc = run_mer(
        "synth",
        str(root / "m.gguf"),
        "--shape",
        "small",
        "--store",
        str(store),
        "--histogram-tokens",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    return store


def cache_bytes(store: Path) -> int:
    manifest = json.loads((store / "manifest.json").read_text())
    slot = max(e["length"] for e in manifest["experts"]["entries"])
    return (-(-slot // 4096) * 4096) * QUARTER + 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`mer serve` in a subprocess: its URL, its processes, its /ready."""

    def __init__(
        self,
        store: Path | None,
        tmp: Path,
        extra_config: str = "",
        env: dict | None = None,
        args: tuple[str, ...] = (),
        supervisor: str = "",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "mer.toml"
        self.tmp, self.store, self.supervisor_extra = tmp, store, supervisor
        self.write_config(extra_config)
        cmd = [*MER, "serve", "--port", str(self.port), "--config", str(self.config), *args]
        if store is not None:  # else the bundled default model, every weight resident
            cmd += ["--model", str(store)]
        self.log = (tmp / "serve.log").open("w+")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def write_config(self, extra: str, cache: int | None = None) -> None:
        """The service's configuration file: fast heartbeats, its own runtime directory, a
        cache of `cache` bytes (default: a quarter of the experts; none for the default
        model), and `extra` (TOML tables other than [supervisor] and [cache])."""
        cache_table = ""
        if self.store is not None:
            cache_table = f"[cache]\nbytes = {cache or cache_bytes(self.store)}\n"
        self.config.write_text(
            "[supervisor]\nheartbeat_s = 0.25\nheartbeat_timeout_s = 3.0\n"
            f'runtime_dir = "{self.tmp / "run"}"\n' + self.supervisor_extra + cache_table + extra
        )

    def get(self, path: str, timeout: float = 5) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, {}

    def ready(self) -> dict | None:
        status, body = self.get("/ready")
        return body if status == 200 else None

    def wait_ready(self, timeout: float = 180) -> dict:
        return wait_for(lambda: self.ready() or self._dead(), timeout, "the service to be ready")

    def _dead(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"mer serve exited {self.proc.returncode}:\n{self.output()}")

    def actor(self, kind: str, index: int = 0) -> dict:
        """The actor's entry in /ready (waiting a little for an answer that has it)."""

        def find():
            _, body = self.get("/ready")
            for a in body.get("actors", []):
                if a["kind"] == kind and a["index"] == index:
                    return a
            return None

        return wait_for(find, 30, f"{kind}.{index} in /ready")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def service_factory(small_store, tmp_path) -> Iterator:
    started = []

    def start(extra_config: str = "", env: dict | None = None, args: tuple[str, ...] = ()):
        service = Service(small_store, tmp_path, extra_config, env, args)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


def mer_processes() -> set[int]:
    """Pids of running mer actors and supervisors."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(c.startswith(b"mer.actors.") for c in cmd) or (
            b"serve" in cmd and any(b"mer.cli" in c for c in cmd)
        ):
            pids.add(int(proc.name))
    return pids


def served_model(client) -> str:
    """The id of the one model the service serves, as a client finds it."""
    [model] = client.models.list().data
    return model.id


def stream_completion(
    url: str, prompt: str, max_tokens: int, seed: int, temperature: float = 0.0, on_chunk=None
) -> tuple[list[int], str, str]:
    """A streamed completion through the official openai client: (token ids, text, finish)."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    ids, text, finish = [], "", None
    stream = client.completions.create(
        model=served_model(client),
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    for n, chunk in enumerate(stream):
        choice = chunk.choices[0]
        ids += getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids", [])
        text += choice.text
        finish = choice.finish_reason or finish
        if on_chunk is not None:
            on_chunk(n)
    return ids, text, finish


@functools.lru_cache(maxsize=64)
def generate_json(
    store: Path, prompt: str, max_tokens: int, seed: int, temperature: float = 0.0
) -> dict:
    proc = run_mer(
        "generate",
        "--model",
        str(store),
        "--cache-bytes",
        str(cache_bytes(store)),
        "--prompt",
        prompt,
        "--max-tokens",
        str(max_tokens),
        "--seed",
        str(seed),
        "--temperature",
        str(temperature),
        "--top-p",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


__all__ = ["Service", "generate_json", "mer_processes", "stream_completion", "time"]
