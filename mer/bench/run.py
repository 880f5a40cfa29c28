"""`mer bench`: prepare the models, run the scenarios' trials, derive the figures, report.

The figures are ratios against peers measured in the same run: mer's tokens/s over
llama.cpp's, mer's seconds per token over llama.cpp's and over the bound, mer's bytes per
token over what its cache alone reads and over Belady's. `check` says whether every figure
the run should have produced is there and sane (finite, positive, both engines ran), which
is what `mer bench --quick` asserts in CI; the goals are judged in the report.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mer.bench import scenarios as sc
from mer.bench.machine import describe
from mer.bench.trials import Results, run_rounds

GiB = 1 << 30


def run(p: sc.Plan, out: Path, log: Callable[[str], None]) -> dict:
    """Run plan `p`; write results.json, results.md and plots into `out`; return the report."""
    out.mkdir(parents=True, exist_ok=True)
    p.workdir.mkdir(parents=True, exist_ok=True)
    results = Results()
    report: dict = {
        "machine": describe(),
        "quick": p.quick,
        "threads": p.threads,
        "cap_bytes": p.cap_bytes,
        "clean_share": p.clean,
        "started": time.time(),
    }
    ids = sc.prompt_ids()
    if "ram" in p.scenarios:
        models = {}
        for name, shape, quant in p.ram_models:
            if shape is None:
                from mer.models.sources import resolve_model

                models[name] = resolve_model(None)
            else:
                models[name] = sc.synth(p.workdir / f"{shape.slug}-{quant}.gguf", shape, quant, log)
        run_rounds(
            sc.ram_configs(p, models, ids),
            results,
            min_clean=p.min_clean,
            max_rounds=p.max_rounds,
            clean=p.clean,
            log=log,
        )
        report["ram_models"] = {name: str(path) for name, path in models.items()}
    if {"disk", "convert"} & set(p.scenarios):
        stem = f"disk-{p.disk_shape.slug}-{p.disk_quant}"
        gguf = sc.synth(p.workdir / f"{stem}.gguf", p.disk_shape, p.disk_quant, log)
        store = p.workdir / f"{stem}-store"
        if "convert" in p.scenarios or not store.exists():
            report["convert"] = sc.convert_capped(p, gguf, store, log)
        report["disk_model_bytes"] = gguf.stat().st_size
        if "disk" in p.scenarios:
            report["fio"] = sc.fio(store / "experts.bin", p.quick)
            configs = sc.disk_configs(p, gguf, store, ids)
            if p.disk_model_fits_ram():
                configs.append(sc.resident_config(p, store, ids))
            run_rounds(
                configs,
                results,
                min_clean=p.min_clean,
                max_rounds=p.max_rounds,
                clean=p.clean,
                log=log,
            )
    report["trials"] = results.to_json()
    report["figures"] = figures(p, results, report)
    report["finished"] = time.time()
    (out / "results.json").write_text(json.dumps(report, indent=1))
    from mer.bench.report import markdown, plots

    (out / "results.md").write_text(markdown(report))
    plots(report, out)
    return report


def figures(p: sc.Plan, results: Results, report: dict) -> dict:
    """The derived figures: per configuration min/median/max of what matters, and ratios."""
    fig: dict = {"ram": {}, "disk": {}}
    for name, config in results.configs.items():
        row = {
            "scenario": config.scenario,
            "engine": config.engine,
            "failure": results.failure(name),
        }
        keys = (
            ("decode_tok_s", "prefill_tok_s")
            if config.scenario == "ram"
            else (
                "decode_s_per_token",
                "bytes_per_token",
                "belady_bytes_per_token",
                "process_read_bytes_per_token",
                "hit_rate",
                "inflight_hit_rate",
                "miss_rate",
                "prefetch_precision",
                "read_gbps",
                "stall_s_per_token",
                "peak_rss_bytes",
            )
        )
        for key in keys:
            row[key] = results.summary(name, key, p.clean)
        trials = results.clean(name, p.clean)
        if trials and config.scenario == "disk":
            n = config.spec["decode_tokens"]
            row["cap_peak_bytes"] = max(t.peak_bytes or 0 for t in trials)
            row["device_bytes_per_trial"] = max(t.device_read_bytes for t in trials)
            row["decode_tokens"] = n
        fig[config.scenario][name] = row
    _ratios(p, fig, report)
    return fig


def _median(row: dict | None, key: str) -> float | None:
    value = (row or {}).get(key)
    return value["median"] if value else None


def _ratios(p: sc.Plan, fig: dict, report: dict) -> None:
    ram = fig["ram"]
    for name in {n.split(" | ")[0] for n in ram}:
        for engine in ("mer", sc.F32):
            ours = ram.get(f"{name} | {engine}")
            for peer in ("llama.cpp", "llama.cpp, repack off"):
                theirs = ram.get(f"{name} | {peer}")
                fig.setdefault("ram_ratios", {})[f"{name} | {engine} / {peer}"] = {
                    phase: _ratio(
                        _median(ours, f"{phase}_tok_s"), _median(theirs, f"{phase}_tok_s")
                    )
                    for phase in ("decode", "prefill")
                }
    disk = fig["disk"]
    if not disk:
        return
    main = f"mer store, {sc.size_text(p.main_budget)} cache"
    plain = disk.get(f"{main}, no read-ahead")
    m = disk.get(main)
    llama = disk.get("llama.cpp mmap, repack off")
    best_bw = (
        max(
            [f["gbps"] for f in report.get("fio", []) if "gbps" in f]
            + [_median(r, "read_gbps") or 0 for n, r in disk.items() if n.startswith("mer store")]
        )
        * 1e9
    )
    compute = resident_compute_s(p, fig)
    belady = _median(m, "belady_bytes_per_token")
    derived = {"best_read_gbps": best_bw / 1e9, "resident_compute_s_per_token": compute}
    if belady and best_bw and compute is not None:
        reads = belady / best_bw
        derived["bound_serial_s"] = reads + compute
        derived["bound_overlapped_s"] = max(reads, compute)
        s = _median(m, "decode_s_per_token")
        if s:
            derived["mer_over_bound_serial"] = s / derived["bound_serial_s"]
            derived["mer_over_bound_overlapped"] = s / derived["bound_overlapped_s"]
    speed = _ratio(_median(llama, "decode_s_per_token"), _median(m, "decode_s_per_token"))
    if speed is not None:
        derived["speedup_over_llama_mmap"] = speed
    more = _ratio(_median(m, "bytes_per_token"), _median(plain, "bytes_per_token"))
    if more is not None:
        derived["bytes_over_no_read_ahead"] = more
    if _ratio(_median(m, "bytes_per_token"), belady) is not None:
        derived["bytes_over_belady"] = _ratio(_median(m, "bytes_per_token"), belady)
    derived["prefetch_precision"] = _median(m, "prefetch_precision")
    fig["disk_ratios"] = derived


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing (no clean trial) or b is 0."""
    return a / b if a is not None and b else None


def resident_compute_s(p: sc.Plan, fig: dict) -> float | None:
    """Seconds per token of the larger-than-memory model with every expert in RAM: measured
    directly where it fits, else the 4-layer model of the same width scaled by depth."""
    resident = fig["disk"].get("mer resident (uncapped)")
    if resident:
        return _median(resident, "decode_s_per_token")
    for name, shape, quant in p.ram_models:
        if (
            shape is not None
            and replace(shape, layers=p.disk_shape.layers) == p.disk_shape
            and quant == p.disk_quant
        ):
            s = _median(fig["ram"].get(f"{name} | mer"), "decode_tok_s")
            return p.disk_shape.layers / shape.layers / s if s else None
    return None


def check(report: dict) -> list[str]:
    """What is missing or not sane in a report: empty when every figure is there, finite and
    positive, and both engines ran in every scenario measured."""
    problems = []

    def sane(value: object) -> bool:
        return isinstance(value, int | float) and math.isfinite(value) and value > 0

    for scenario in ("ram", "disk"):
        rows = report["figures"].get(scenario, {})
        engines = {row["engine"] for row in rows.values() if row.get("failure") is None}
        if rows and engines != {"mer", "llama.cpp"}:
            problems.append(f"{scenario}: engines that ran: {sorted(engines)}")
        for name, row in rows.items():
            if "default (repack)" in name:  # may fail to load under the cap: that is a figure
                continue
            keys = (
                ["decode_tok_s", "prefill_tok_s"] if scenario == "ram" else ["decode_s_per_token"]
            )
            if scenario == "disk" and row["engine"] == "mer" and "resident" not in name:
                keys += [
                    "process_read_bytes_per_token",
                    "bytes_per_token",
                    "belady_bytes_per_token",
                    "miss_rate",
                ]
            for key in keys:
                value = row.get(key)
                if not (value and sane(value["median"])):
                    problems.append(f"{name}: {key} = {value} ({row.get('failure')})")
    ratios = report["figures"].get("disk_ratios", {})
    for key in (
        "bound_serial_s",
        "speedup_over_llama_mmap",
        "bytes_over_no_read_ahead",
        "bytes_over_belady",
        "best_read_gbps",
    ):
        if report["figures"].get("disk") and not sane(ratios.get(key)):
            problems.append(f"disk: {key} = {ratios.get(key)}")
    if "convert" in report and not report["convert"].get("ok"):
        problems.append(f"convert: {report['convert']}")
    return problems


def clean_workdir(p: sc.Plan) -> None:
    shutil.rmtree(p.workdir, ignore_errors=True)
