"""`mer bench`: mer against llama.cpp, fio and the bound, measured side by side (mer.bench)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mer.cli.common import FlagError, parse_size, whole
from mer.errors import MerError

SCENARIOS = ("ram", "disk", "convert")


def add_bench(sub: argparse._SubParsersAction) -> None:
    from mer.synth import SHAPES

    p = sub.add_parser(
        "bench",
        help="measure mer against llama.cpp in RAM and larger than memory (a Markdown table, "
        "JSON and plots)",
        description="Every scenario runs both engines in one run, alternating, with the same "
        "threads, until each has enough trials during which other processes left the CPUs "
        "alone. The larger-than-memory model (Mixtral-8x7B-shaped, 24.6 GiB, unless "
        "--disk-shape says otherwise) and the in-RAM ones are made by `mer synth` into "
        "--workdir the first time.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small models and one clean trial each: checks every figure is produced "
        "(a few minutes)",
    )
    p.add_argument("--out", help="results folder (default: bench-results/DATE)")
    p.add_argument(
        "--workdir",
        default=str(Path.home() / ".cache" / "mer-bench"),
        help="where the models are made and kept",
    )
    p.add_argument(
        "--scenarios",
        nargs="+",
        choices=SCENARIOS,
        default=list(SCENARIOS),
        help="which scenarios to run",
    )
    p.add_argument(
        "--memory-cap",
        type=parse_size,
        help="memory cap of the larger-than-memory scenario (default: 8G; quick: 1.5G)",
    )
    p.add_argument(
        "--disk-shape",
        choices=sorted(SHAPES),
        default="mixtral-8x7b",
        help="shape of the larger-than-memory model (mer synth's presets: qwen3-30b-a3b for "
        "many small experts, deepseek-v2-lite for latent attention and shared experts)",
    )
    p.add_argument(
        "--ram-models",
        nargs="+",
        metavar="TEXT",
        help="only the in-RAM models whose names contain one of these (e.g. smollm2 qwen3)",
    )
    p.add_argument("--threads", type=whole(1), help="threads of both engines (default: all cores)")
    p.add_argument("--trials", type=whole(1), default=3, help="clean trials per configuration")
    p.set_defaults(run=run_bench)


def run_bench(opts: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile

    from mer.bench import cgroup
    from mer.bench.run import check, run
    from mer.bench.scenarios import plan

    if {"disk", "convert"} & set(opts.scenarios) and cgroup.available() is None:
        raise MerError(
            "the larger-than-memory scenarios need a memory cgroup (run as root on a kernel "
            "with the memory controller), or run --scenarios ram"
        )
    threads = opts.threads or os.cpu_count() or 1
    workdir = Path(tempfile.mkdtemp(prefix="mer-bench-")) if opts.quick else Path(opts.workdir)
    out = Path(opts.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        p = plan(
            opts.quick,
            workdir,
            threads,
            opts.memory_cap,
            opts.trials,
            tuple(opts.scenarios),
            opts.disk_shape,
            tuple(opts.ram_models or ()),
        )
    except ValueError as err:
        raise FlagError(str(err)) from None

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        report = run(p, out, log)
    finally:
        if opts.quick:
            shutil.rmtree(workdir, ignore_errors=True)
    print((out / "results.md").read_text())
    problems = check(report)
    for problem in problems:
        print(f"mer: missing or not sane: {problem}", file=sys.stderr)
    print(f"results in {out}/ (results.md, results.json, *.png)", file=sys.stderr)
    return 1 if problems else 0
