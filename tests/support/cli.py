"""Running the real `mer` command in a subprocess, and checking how it fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MER = [sys.executable, "-m", "mer.cli"]


def run_mer(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`mer ARGS...` to completion, output captured as text."""
    return subprocess.run([*MER, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def spawn_mer(*args: str, **kwargs) -> subprocess.Popen:
    """`mer ARGS...` started in a new session (its own process group), output piped."""
    return subprocess.Popen(
        [*MER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **kwargs,
    )


def assert_one_line_error(
    proc: subprocess.CompletedProcess, *needles: str, code: int | None = None
) -> str:
    """The command failed (with exit `code` if given) and said so in one stderr line that
    contains every needle, without a traceback. Returns the line."""
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def wait_for(condition: Callable[[], object], timeout: float = 60, what: str = "") -> object:
    """Poll `condition` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or condition}")


def shm_segments(pid: int) -> list[str]:
    """Names of mer's shared-memory segments owned by process `pid`."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"mer.{pid}.")]


def write_random_mixtral(
    path: Path, *, n_layers: int, n_experts: int, dim: int, ffn: int, seed: int = 0
) -> Path:
    """A random float32 Mixtral checkpoint (config.json + one safetensors file) written
    straight with NumPy: a model of any size in the time it takes to write it."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    vocab, heads, kv = 256, 4, 2
    hd = dim // heads

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": mat(vocab, dim),
        "model.norm.weight": np.ones(dim, np.float32),
        "lm_head.weight": mat(vocab, dim),
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = np.ones(dim, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(dim, np.float32)
        tensors[p + "self_attn.q_proj.weight"] = mat(heads * hd, dim)
        tensors[p + "self_attn.k_proj.weight"] = mat(kv * hd, dim)
        tensors[p + "self_attn.v_proj.weight"] = mat(kv * hd, dim)
        tensors[p + "self_attn.o_proj.weight"] = mat(dim, heads * hd)
        tensors[p + "block_sparse_moe.gate.weight"] = mat(n_experts, dim)
        for e in range(n_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors[q + "w1.weight"] = mat(ffn, dim)
            tensors[q + "w3.weight"] = mat(ffn, dim)
            tensors[q + "w2.weight"] = mat(dim, ffn)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": dim,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_local_experts": n_experts,
        "num_experts_per_tok": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path
