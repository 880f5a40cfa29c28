"""The scenarios of `mer bench`: what is measured, on which models, against which peer.

- in RAM: decode and prefill tokens/s of mer (its default 8-bit activations, and float
  ones) and llama.cpp on the same GGUF file, same threads; llama.cpp with its weight
  repacking (its default) and without.
- larger than memory: a model several times the memory cap, both engines under the cap
  (page cache included), the page cache dropped before each trial: seconds per token, bytes
  read per token, the cache's figures, and the bound (Belady's bytes at the best read speed
  measured, plus or overlapped with the compute of a resident model).
- convert: `mer convert` of the large model under the same cap.
- fio: the disk's own O_DIRECT read speed on the same file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from mer.bench.cgroup import MemoryCap, drop_page_cache
from mer.bench.trials import Config
from mer.synth import SHAPES, Shape

GiB = 1 << 30
F32 = "mer, f32 activations"  # mer in RAM with float activations ("mer": its default, q8)
PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press. Within fifty years, "
    "presses were operating in more than two hundred European cities, and the cost of books fell"
)


@dataclass(frozen=True)
class Plan:
    """Everything a `mer bench` run measures, and how hard."""

    quick: bool
    workdir: Path
    threads: int
    cap_bytes: int
    budgets: tuple[int, ...]  # the cache sweep of the larger-than-memory scenario
    main_budget: int  # the budget the goals are measured at
    min_clean: int
    max_rounds: int
    clean: float
    decode_tokens: int
    disk_decode_tokens: int
    ram_models: tuple[tuple[str, Shape | None, str], ...]  # (name, shape or None: bundled, quant)
    disk_shape: Shape = field(default_factory=lambda: SHAPES["mixtral-8x7b"])
    disk_quant: str = "q4_0"
    scenarios: tuple[str, ...] = ("ram", "disk", "convert")

    def disk_model_fits_ram(self) -> bool:
        """Whether the larger-than-memory model fits in RAM uncapped (quick runs): then its
        resident compute is measured directly."""
        from mer.bench.machine import describe
        from mer.models.sources import resolve_model
        from mer.synth import synth_size

        size = synth_size(self.disk_shape, self.disk_quant, resolve_model(None))
        return size < 0.4 * describe()["memory_bytes"]


QUICK_DISK = Shape(
    layers=8, experts=8, top_k=2, dim=1024, ffn=2048, heads=8, kv_heads=2, context=1024
)


def plan(
    quick: bool,
    workdir: Path,
    threads: int,
    cap_bytes: int | None,
    trials: int,
    scenarios: tuple[str, ...],
    disk_shape: str = "mixtral-8x7b",
    ram_models: tuple[str, ...] = (),
) -> Plan:
    """The plan of a run; `disk_shape` names the larger-than-memory model's shape (SHAPES),
    whose cache budgets are a quarter, a half and three quarters of the memory cap;
    `ram_models`, when given, keeps the in-RAM models whose names contain one of them
    (case-insensitive; ValueError when none does)."""
    p = _plan(quick, workdir, threads, cap_bytes, trials, scenarios, disk_shape)
    if not ram_models:
        return p
    wanted = [w.lower() for w in ram_models]
    kept = tuple(m for m in p.ram_models if any(w in m[0].lower() for w in wanted))
    if not kept:
        names = "; ".join(m[0] for m in p.ram_models)
        raise ValueError(f"--ram-models {' '.join(ram_models)}: no in-RAM model matches ({names})")
    return replace(p, ram_models=kept)


def _plan(quick, workdir, threads, cap_bytes, trials, scenarios, disk_shape) -> Plan:
    if quick:
        return Plan(
            quick=True,
            workdir=workdir,
            threads=threads,
            cap_bytes=cap_bytes or 1536 << 20,
            budgets=(48 << 20, 96 << 20),
            main_budget=96 << 20,
            min_clean=1,
            max_rounds=3,
            clean=0.25,
            decode_tokens=8,
            disk_decode_tokens=8,
            ram_models=(
                ("SmolLM2-135M Q4_1", None, ""),
                ("synthetic small Q4_0", SHAPES["small"], "q4_0"),
            ),
            disk_shape=QUICK_DISK,
            scenarios=scenarios,
        )
    cap = cap_bytes or 8 * GiB
    return Plan(
        quick=False,
        workdir=workdir,
        threads=threads,
        cap_bytes=cap,
        budgets=(cap // 4, cap // 2, cap * 3 // 4),
        main_budget=cap * 3 // 4,
        min_clean=trials,
        max_rounds=trials + 4,
        clean=0.05,
        decode_tokens=64,
        disk_decode_tokens=24,
        ram_models=(
            ("SmolLM2-135M Q4_1", None, ""),
            ("Mixtral-shaped 4 layers Q4_0", SHAPES["mixtral-4l"], "q4_0"),
            ("Mixtral-shaped 4 layers Q8_0", SHAPES["mixtral-4l"], "q8_0"),
            ("Mixtral-shaped 4 layers Q4_K_M-style", SHAPES["mixtral-4l"], "q4_k_m"),
            # many small experts: 128 per layer, top-8, 768-wide
            ("Qwen3-30B-A3B-shaped 4 layers Q4_0", SHAPES["qwen3-30b-a3b-4l"], "q4_0"),
            # latent attention, 64 experts top-6, shared experts, a dense first layer
            ("DeepSeek-V2-Lite-shaped 4 layers Q4_0", SHAPES["deepseek-v2-lite-4l"], "q4_0"),
        ),
        disk_shape=SHAPES[disk_shape],
        scenarios=scenarios,
    )


def prompt_ids(n: int | None = None) -> list[int]:
    """The prompt's token ids in the bundled vocabulary (every model here shares it)."""
    import mer
    from mer.models.sources import resolve_model

    ids = mer.load_model(resolve_model(None)).tokenizer.encode(PROMPT)
    return ids[:n] if n else ids


def synth(path: Path, shape: Shape, quant: str, log) -> Path:
    """The synthetic model at `path`, written unless it is there already."""
    if path.exists():
        return path
    from mer.models.sources import resolve_model
    from mer.synth import Knobs, write_gguf

    start = time.monotonic()
    partial = path.with_name(path.name + ".partial")
    write_gguf(partial, shape, quant, Knobs(), resolve_model(None))
    partial.rename(path)
    size = path.stat().st_size / GiB
    log(f"wrote {path.name} ({size:.2f} GiB) in {time.monotonic() - start:.0f} s")
    return path


def size_text(n: int) -> str:
    """A byte count as people write budgets: 6 GiB, 48 MiB."""
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / (1 << 20):g} MiB"


def ram_configs(p: Plan, models: dict[str, Path], ids: list[int]) -> list[Config]:
    configs = []
    for name, path in models.items():
        spec = {
            "model": str(path),
            "threads": p.threads,
            "prompt_ids": ids,
            "decode_tokens": p.decode_tokens,
        }
        configs += [
            Config(f"{name} | mer", "ram", "mer", {**spec, "kind": "mer"}),
            Config(f"{name} | {F32}", "ram", "mer", {**spec, "kind": "mer", "activations": "f32"}),
            Config(f"{name} | llama.cpp", "ram", "llama.cpp", {**spec, "kind": "llama"}),
            Config(
                f"{name} | llama.cpp, repack off",
                "ram",
                "llama.cpp",
                {**spec, "kind": "llama", "repack": False},
            ),
        ]
    return configs


def disk_configs(p: Plan, gguf: Path, store: Path, ids: list[int]) -> list[Config]:
    spec = {"prompt_ids": ids[:16], "decode_tokens": p.disk_decode_tokens, "threads": p.threads}
    capped = {"scenario": "disk", "cap_bytes": p.cap_bytes, "drop_cache": True}
    configs = []
    for budget in p.budgets:
        configs.append(
            Config(
                f"mer store, {size_text(budget)} cache",
                engine="mer",
                spec={**spec, "kind": "mer", "model": str(store), "cache_bytes": budget},
                **capped,
            )
        )
    main = {**spec, "kind": "mer", "model": str(store), "cache_bytes": p.main_budget}
    configs += [
        Config(
            f"mer store, {size_text(p.main_budget)} cache, no read-ahead",
            engine="mer",
            spec={**main, "prefetch": False},
            **capped,
        ),
        Config(
            f"mer store, {size_text(p.main_budget)} cache, reads not merged",
            engine="mer",
            spec={**main, "coalesce": False},
            **capped,
        ),
        Config(
            f"mer GGUF, {size_text(p.main_budget)} cache",
            engine="mer",
            spec={**spec, "kind": "mer", "model": str(gguf), "cache_bytes": p.main_budget},
            **capped,
        ),
        Config(
            "llama.cpp mmap, repack off",
            engine="llama.cpp",
            spec={**spec, "kind": "llama", "model": str(gguf), "repack": False},
            **capped,
        ),
        Config(
            "llama.cpp default (repack)",
            engine="llama.cpp",
            spec={**spec, "kind": "llama", "model": str(gguf)},
            # its repacked weights are anonymous memory: a model larger than the cap either
            # fails to load or thrashes for as long as it is let (minutes to hours)
            timeout_s=600.0,
            **capped,
        ),
    ]
    return configs


def resident_config(p: Plan, store: Path, ids: list[int]) -> Config:
    """The larger-than-memory model with every expert resident and no cap (where it fits)."""
    spec = {
        "kind": "mer",
        "model": str(store),
        "prompt_ids": ids[:16],
        "decode_tokens": p.disk_decode_tokens,
        "threads": p.threads,
    }
    return Config("mer resident (uncapped)", "disk", "mer", spec)


def convert_capped(p: Plan, gguf: Path, store: Path, log) -> dict:
    """`mer convert` of `gguf` into `store` under the memory cap: seconds and peak memory."""
    if store.exists():
        shutil.rmtree(store)
    drop_page_cache()
    cmd = [sys.executable, "-m", "mer.cli", "convert", str(gguf), str(store)]
    start = time.monotonic()
    with MemoryCap(p.cap_bytes) as cap:
        proc = cap.run(cmd, capture_output=True, text=True)
        peak = cap.peak_bytes()
    result = {
        "seconds": time.monotonic() - start,
        "peak_bytes": peak,
        "cap_bytes": p.cap_bytes,
        "ok": proc.returncode == 0,
        "model_bytes": gguf.stat().st_size,
    }
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        killed = proc.returncode == -9
        result["error"] = (
            "killed: out of memory under the cap" if killed else (f"exit {proc.returncode}: {last}")
        )
    log(
        f"convert under the cap: {'ok' if result['ok'] else result.get('error')} in "
        f"{result['seconds']:.0f} s, peak {peak / GiB:.2f} GiB"
    )
    return result


def fio(path: Path, quick: bool) -> list[dict]:
    """fio's sequential O_DIRECT io_uring reads of `path` at a few block sizes and depths."""
    if shutil.which("fio") is None:
        return [{"error": "fio is not installed"}]
    runs = [(4, 16), (16, 64)] if quick else [(4, 16), (4, 64), (16, 64)]
    out = []
    for mib, depth in runs:
        drop_page_cache()
        cmd = [
            "fio",
            "--name=read",
            f"--filename={path}",
            "--readonly",
            "--direct=1",
            "--ioengine=io_uring",
            "--rw=read",
            f"--bs={mib}M",
            f"--iodepth={depth}",
            f"--runtime={3 if quick else 10}",
            "--time_based",
            "--output-format=json",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        try:
            bw = json.loads(proc.stdout)["jobs"][0]["read"]["bw_bytes"]
            out.append({"block_mib": mib, "depth": depth, "gbps": bw / 1e9})
        except (ValueError, KeyError, IndexError):
            out.append({"block_mib": mib, "depth": depth, "error": proc.stderr.strip()[-200:]})
    return out
