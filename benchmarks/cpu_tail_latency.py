#!/usr/bin/env python
"""Tail latency of single CPU dropout calls at 2^24 float32 elements under each way of
mapping a fresh output: with and without this package's transparent-huge-page hint
(FUSED_DROPOUT_HUGE_PAGES=1 / 0), and with torch's own allocator hint instead
(THP_MEM_ALLOC_ENABLE=1, which covers torch.mul's outputs too); on an idle machine and beside
a neighbour process that fragments memory.

Each setting runs in its own process (the variables are read once per process); the
settings take turns in rounds, so machine load hits them alike. Per setting: p50, p95 and
max over all calls, next to torch.mul and x.clone() timed in the same processes.

    python benchmarks/cpu_tail_latency.py [--calls 40] [--rounds 5] [--out runs/cpu_tail_latency]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import DefaultsHelpFormatter, percentile, provenance, write_results

WORKER = r"""
import json, sys, time, torch, fused_dropout
calls = int(sys.argv[1])
x = torch.randn(2**24)
times = {"fused_dropout": [], "torch.mul": [], "clone": []}
ops = {"fused_dropout": lambda: fused_dropout.dropout(x, 0.5), "torch.mul": lambda: torch.mul(x, 2.0),
       "clone": lambda: x.clone()}
for name, op in ops.items():
    op()
for _ in range(calls):
    for name, op in ops.items():
        start = time.perf_counter()
        y = op()
        times[name].append((time.perf_counter() - start) * 1e3)
        del y
print(json.dumps(times))
"""

NEIGHBOUR = r"""
import random, time
import numpy as np
rng = random.Random(0)
held = []
end = time.time() + float(__import__("sys").argv[1])
while time.time() < end:
    # Allocate and touch blocks of random sizes, free a random half: the allocator and the
    # kernel see memory that is mapped and unmapped in pieces all the time.
    block = np.ones(rng.randint(1, 64) * 2**18, dtype=np.uint8)
    held.append(block)
    if len(held) > 40:
        for _ in range(20):
            held.pop(rng.randrange(len(held)))
"""


# Each setting: the environment its worker runs with (on top of this process's, with both
# variables removed first).
SETTINGS = {
    "FUSED_DROPOUT_HUGE_PAGES=0": {"FUSED_DROPOUT_HUGE_PAGES": "0"},
    "FUSED_DROPOUT_HUGE_PAGES=1": {"FUSED_DROPOUT_HUGE_PAGES": "1"},
    "THP_MEM_ALLOC_ENABLE=1": {"FUSED_DROPOUT_HUGE_PAGES": "0", "THP_MEM_ALLOC_ENABLE": "1"},
}


def run_round(setting, calls):
    env = {k: v for k, v in os.environ.items() if k not in ("FUSED_DROPOUT_HUGE_PAGES", "THP_MEM_ALLOC_ENABLE")}
    env.update(SETTINGS[setting], OMP_NUM_THREADS=str(os.cpu_count()))
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(calls)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--calls", type=int, default=40, help="calls per setting per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every setting, taken in turn")
    parser.add_argument("--out", default="runs/cpu_tail_latency", help="output folder")
    args = parser.parse_args()
    results = {}
    for neighbour in (False, True):
        proc = None
        if neighbour:
            proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, "3600"])
            time.sleep(2)
        try:
            collected = {setting: {} for setting in SETTINGS}
            for round_index in range(args.rounds):
                for setting in SETTINGS:
                    for name, values in run_round(setting, args.calls).items():
                        collected[setting].setdefault(name, []).extend(values)
                print(f"  {'neighbour' if neighbour else 'idle'}: round {round_index + 1}/{args.rounds}", flush=True)
        finally:
            if proc is not None:
                proc.kill()
        for setting, by_op in collected.items():
            for name, values in by_op.items():
                key = f"{'fragmenting neighbour' if neighbour else 'idle'} | {setting} | {name}"
                results[key] = {
                    "calls": len(values),
                    "p50_ms": statistics.median(values),
                    "p95_ms": percentile(values, 0.95),
                    "max_ms": max(values),
                }
    lines = [
        f"# CPU tail latency, 2^24 float32, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}",
        "",
        f"{args.rounds} rounds x {args.calls} calls per setting, settings interleaved; each call timed alone.",
        "",
        "| machine | setting | op | calls | p50 ms | p95 ms | max ms |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for key, r in results.items():
        machine, setting, op = key.split(" | ")
        lines.append(
            f"| {machine} | {setting} | {op} | {r['calls']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['max_ms']:.1f} |"
        )
    write_results(args.out, provenance("cpu"), "\n".join(lines), results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
