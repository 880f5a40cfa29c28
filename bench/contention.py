"""Decode speed beside a competing CPU load: mer on one thread, on every thread at every call
(as mer ran before its thread policy), and with each call's thread count chosen from measured
cost (mer.kernels.threads, the default).

Each trial is a fresh process that loads the bundled model (or --model), compiles, prefills a
prompt and decodes greedily; the first 16 tokens are not timed. Beside it run L busy-loop
processes (--loads, default 0, 1 and 2: on two cores, idle, half busy and fully busy). Trials
alternate modes and are repeated until every (load, mode) has --trials clean ones: trials
during which processes other than the trial and its load used at most 5% of the CPUs
(mer/bench/machine.py; steal time counts). Prints min / median / max tokens/s and a table last.

    python bench/contention.py [--model PATH] [--tokens 200] [--loads 0 1 2] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from mer.bench.machine import CPUS, Share

MODES = {
    "1 thread": ["--threads", "1"],
    "all, fixed (before)": ["--fixed"],
    "adaptive (now)": [],
}
PROMPT = "The history of the printing press begins in the fifteenth century, when Johannes"
SKIP = 16  # tokens decoded before timing starts


def worker(opts: argparse.Namespace) -> None:
    """One trial: print {"tok_s": ..., "serial_share": ...} as JSON."""
    import mer
    from mer.kernels import matmul
    from mer.models.sources import resolve_model
    from mer.sampling import SamplingParams

    model = mer.load_model(resolve_model(opts.model))
    threads = opts.threads or matmul.get_num_threads()
    matmul.set_num_threads(threads, adaptive=not opts.fixed)
    model.warm_up()
    ids = model.tokenizer.encode(PROMPT)
    stamps = []
    total = opts.tokens + SKIP
    for _ in model.generate(ids, SamplingParams(temperature=0.0), total, stop_ids=frozenset()):
        stamps.append(time.perf_counter())
    timed = stamps[SKIP:]
    choices = matmul.thread_policy().choices()
    serial = sum(c == 1 for c in choices.values()) / len(choices) if choices else None
    print(json.dumps({"tok_s": (len(timed) - 1) / (timed[-1] - timed[0]), "serial": serial}))


def trial(opts: argparse.Namespace, mode: str, hogs: list[subprocess.Popen]) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--tokens", str(opts.tokens), *MODES[mode]]
    if opts.model:
        cmd += ["--model", opts.model]
    with Share([h.pid for h in hogs]) as share:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "others": share.others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF file or store (default: the bundled SmolLM2)")
    parser.add_argument("--tokens", type=int, default=200, help="timed tokens per trial")
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="busy loops")
    parser.add_argument("--trials", type=int, default=3, help="clean trials per cell")
    parser.add_argument("--max-rounds", type=int, default=10)
    parser.add_argument("--clean", type=float, default=0.05, help="max others' CPU share")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fixed", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts)
        return

    results: dict[tuple[int, str], list[dict]] = {}
    for load in opts.loads:
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            time.sleep(0.5)
            for _ in range(opts.max_rounds):
                for mode in MODES:
                    r = trial(opts, mode, hogs)
                    results.setdefault((load, mode), []).append(r)
                    print(
                        f"load {load}  {mode:<20} {r['tok_s']:7.1f} tok/s  "
                        f"others {r['others']:.1%}",
                        flush=True,
                    )
                clean = [sum(r["others"] <= opts.clean for r in results[(load, m)]) for m in MODES]
                if min(clean) >= opts.trials:
                    break
        finally:
            for h in hogs:
                h.kill()
                h.wait()

    print()
    print(f"{CPUS} CPUs; a load is that many busy-loop processes; tokens/s min / median / max")
    print(f"over clean trials (others <= {opts.clean:.0%} of the CPUs), and the median's ratio")
    print(
        f"{'load':>4}  {'mode':<20}{'min':>7}{'median':>8}{'max':>7}{'clean':>7}"
        f"{'/ 1 thr':>9}{'/ before':>10}"
    )
    for load in opts.loads:
        medians = {}
        for mode in MODES:
            rates = sorted(r["tok_s"] for r in results[(load, mode)] if r["others"] <= opts.clean)
            medians[mode] = statistics.median(rates) if rates else float("nan")
        for mode in MODES:
            rates = sorted(r["tok_s"] for r in results[(load, mode)] if r["others"] <= opts.clean)
            lo, hi = (rates[0], rates[-1]) if rates else (float("nan"),) * 2
            med = medians[mode]
            print(
                f"{load:>4}  {mode:<20}{lo:>7.1f}{med:>8.1f}{hi:>7.1f}{len(rates):>7}"
                f"{med / medians['1 thread']:>9.2f}{med / medians['all, fixed (before)']:>10.2f}"
            )


if __name__ == "__main__":
    main()
