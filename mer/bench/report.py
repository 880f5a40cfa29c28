"""A `mer bench` report as Markdown tables and PNG plots."""

from __future__ import annotations

import time
from pathlib import Path

GiB = 1 << 30


def _spread(value: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not value:
        return "-"
    lo, med, hi = (value[k] * scale for k in ("min", "median", "max"))
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _num(value: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# mer bench" + (" (quick)" if report["quick"] else ""),
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(report['started']))}, "
        f"{(report['finished'] - report['started']) / 60:.0f} min. Machine: {m['cpu']}, "
        f"{m['cpus']} CPUs ({', '.join(m['simd'])}), {m['memory_bytes'] / GiB:.1f} GiB RAM, "
        f"disk {m['disk']['device'] or '?'}; kernel {m['kernel']}. Both engines use "
        f"{report['threads']} threads. Figures are medians (min-max) over trials during which "
        f"other processes used at most {report['clean_share']:.0%} of the CPUs.",
        "",
    ]
    fig = report["figures"]
    if fig.get("ram"):
        lines += [
            "## In RAM",
            "",
            "| model | engine | decode tok/s | prefill tok/s |",
            "|---|---|---|---|",
        ]
        for name, row in sorted(fig["ram"].items()):
            model, engine = name.split(" | ")
            if row["failure"]:
                lines.append(f"| {model} | {engine} | failed: {row['failure']} | |")
                continue
            lines.append(
                f"| {model} | {engine} | {_spread(row['decode_tok_s'], digits=1)} | "
                f"{_spread(row['prefill_tok_s'], digits=1)} |"
            )
        lines += ["", "| model | mer ÷ peer | decode | prefill |", "|---|---|---|---|"]
        for name, r in sorted(fig.get("ram_ratios", {}).items()):
            model, ratio = name.split(" | ")
            lines.append(f"| {model} | {ratio} | {_num(r['decode'])} | {_num(r['prefill'])} |")
        lines.append("")
    if fig.get("disk"):
        cap = report["cap_bytes"] / GiB
        lines += [
            "## Larger than memory",
            "",
            f"A {report['disk_model_bytes'] / GiB:.1f} GiB model under a {cap:g} GiB memory cap "
            "(cgroup, page cache included), page cache dropped before each trial. Bytes per "
            "token: mer's own count, and what the process read from storage.",
            "",
            "| configuration | s/token | bytes/token (mer) | read/token (process) | ready / "
            "in flight / missed | read-ahead precision | Belady bytes/token | peak memory |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in fig["disk"].items():
            if row["failure"]:
                lines.append(f"| {name} | failed: {row['failure']} | | | | | | |")
                continue
            rates = "/".join(
                _num((row.get(k) or {}).get("median"), ".2f")
                for k in ("hit_rate", "inflight_hit_rate", "miss_rate")
            )
            lines.append(
                f"| {name} | {_spread(row['decode_s_per_token'])} | "
                f"{_spread(row.get('bytes_per_token'), 1 / 1e9)} GB | "
                f"{_spread(row.get('process_read_bytes_per_token'), 1 / 1e9)} GB | {rates} | "
                f"{_num((row.get('prefetch_precision') or {}).get('median'))} | "
                f"{_spread(row.get('belady_bytes_per_token'), 1 / 1e9)} GB | "
                f"{_num((row.get('cap_peak_bytes') or 0) / GiB, '.1f', ' GiB')} |"
            )
        r = fig.get("disk_ratios", {})
        lines += [
            "",
            f"Best read speed {_num(r.get('best_read_gbps'))} GB/s (fio or mer's own); "
            f"resident compute {_num(r.get('resident_compute_s_per_token'), '.3f')} s/token; "
            f"bound {_num(r.get('bound_serial_s'))} s/token (Belady's bytes at that speed plus "
            f"the compute), {_num(r.get('bound_overlapped_s'))} s/token with reads overlapped.",
            "",
            "| figure | value | goal |",
            "|---|---|---|",
            f"| mer ÷ llama.cpp (mmap) speed | {_num(r.get('speedup_over_llama_mmap'))}x | >= 5x |",
            f"| bytes read ÷ the cache alone (no read-ahead) | "
            f"{_num(r.get('bytes_over_no_read_ahead'))} | <= 1.1 |",
            f"| read-ahead precision | {_num(r.get('prefetch_precision'))} | >= 0.8 |",
            f"| bytes read ÷ Belady's | {_num(r.get('bytes_over_belady'))} | |",
            f"| s/token ÷ bound (reads + compute) | {_num(r.get('mer_over_bound_serial'))} | "
            "<= 1.3 |",
            f"| s/token ÷ bound (overlapped) | {_num(r.get('mer_over_bound_overlapped'))} | |",
            "",
        ]
    for f in report.get("fio", []):
        if "gbps" in f:
            lines.append(
                f"- fio O_DIRECT io_uring, {f['block_mib']} MiB blocks, depth "
                f"{f['depth']}: {f['gbps']:.2f} GB/s"
            )
    if "convert" in report:
        c = report["convert"]
        lines.append(
            f"- `mer convert` of the {c['model_bytes'] / GiB:.1f} GiB GGUF under the "
            f"{c['cap_bytes'] / GiB:g} GiB cap: {'completed' if c['ok'] else c.get('error')} "
            f"in {c['seconds']:.0f} s, peak memory {c['peak_bytes'] / GiB:.2f} GiB"
        )
    return "\n".join(lines) + "\n"


def plots(report: dict, out: Path) -> list[Path]:
    """PNG plots of the larger-than-memory scenario into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    disk = report["figures"].get("disk", {})
    sweep = sorted(
        (row["config_budget"], name, row)
        for name, row in ((n, {**r, "config_budget": _budget(n)}) for n, r in disk.items())
        if row["config_budget"]
        and "store" in name
        and "no read-ahead" not in name
        and not row["failure"]
    )
    written = []
    if not sweep:
        return written
    budgets = [b for b, _, _ in sweep]
    rows = [r for _, _, r in sweep]

    def med(row: dict, key: str) -> float:
        return (row.get(key) or {}).get("median") or 0.0

    fig, ax = plt.subplots(figsize=(6, 4))
    s = [med(r, "decode_s_per_token") for r in rows]
    spread = [r.get("decode_s_per_token") or {} for r in rows]  # {} when no trial was clean
    err = [
        [m - d.get("min", m) for m, d in zip(s, spread, strict=True)],
        [d.get("max", m) - m for m, d in zip(s, spread, strict=True)],
    ]
    ax.errorbar(budgets, s, yerr=err, marker="o", label="mer (store)")
    llama = disk.get("llama.cpp mmap, repack off")
    if llama and not llama["failure"]:
        ax.axhline(med(llama, "decode_s_per_token"), color="C3", label="llama.cpp (mmap)")
    bound = report["figures"].get("disk_ratios", {}).get("bound_serial_s")
    if bound:
        ax.axhline(bound, color="C2", linestyle="--", label="bound at the main budget")
    ax.set_xlabel("expert cache (GiB)")
    ax.set_ylabel("seconds per token")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Larger than memory: time per token")
    written.append(_save(fig, out / "seconds_per_token.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.25
    x = range(len(budgets))
    ax.bar(
        [i - width for i in x],
        [med(r, "bytes_per_token") / 1e9 for r in rows],
        width,
        label="mer read",
    )
    ax.bar(
        list(x), [med(r, "belady_bytes_per_token") / 1e9 for r in rows], width, label="Belady's MIN"
    )
    ax.bar(
        [i + width for i in x],
        [med(r, "process_read_bytes_per_token") / 1e9 for r in rows],
        width,
        label="process read (storage)",
    )
    labels = [f"{b:g} GiB" if b >= 1 else f"{b * 1024:g} MiB" for b in budgets]
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("GB per token")
    ax.legend()
    ax.set_title("Bytes read per token")
    written.append(_save(fig, out / "bytes_per_token.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(rows)
    for key, label in (
        ("hit_rate", "ready"),
        ("inflight_hit_rate", "in flight"),
        ("miss_rate", "missed"),
    ):
        values = [med(r, key) for r in rows]
        ax.bar(labels, values, bottom=bottom, label=label)
        bottom = [a + b for a, b in zip(bottom, values, strict=True)]
    ax.set_ylabel("share of expert uses")
    ax.legend()
    ax.set_title("Where each expert use found its expert")
    written.append(_save(fig, out / "hits.png"))
    return written


def _budget(name: str) -> float | None:
    """The cache budget in GiB named in a configuration's name ("mer store, 6 GiB cache")."""
    for part in name.split(", "):
        if part.endswith(" cache"):
            number, unit = part.split()[:2]
            return float(number) / (1024 if unit == "MiB" else 1)
    return None


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
