"""What every benchmark script shares: the timer, inputs that defeat the caches, saved-bytes
counting, the noise flag on ratios, where a number comes from, and the writers.

Every results file records its provenance: the commit, whether the tree had uncommitted
changes, torch and CUDA versions, the device and the date. A ratio whose timings spread more
than the effect it reports is flagged, so a noisy machine cannot pass for a measured gain.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def percentile(values, q):
    """The q-quantile (0 < q <= 1) of values by the nearest-rank method: a value that occurred."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Timing(float):
    """A median time in seconds (the float itself) and the spread of the runs behind it:
    ``spread`` is the interquartile range over the median, ``p95`` and ``max`` the tails."""

    spread: float
    p95: float
    max: float

    @classmethod
    def of(cls, times):
        median = statistics.median(times)
        timing = cls(median)
        spread = percentile(times, 0.75) - percentile(times, 0.25)
        timing.spread = spread / median if median > 0 else float("inf")
        timing.p95, timing.max = percentile(times, 0.95), max(times)
        return timing


class Timer:
    """``Timing`` of fn() over reps runs after warm-up."""

    def __init__(self, device, reps, warmup):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn) -> Timing:
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return Timing.of(times)
        # Events around each call, the calls issued back to back with no host sync in
        # between: where the device is the bottleneck the host runs ahead and an interval
        # is device time; where the host is (small sizes), it includes the launch cost.
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        torch.cuda.synchronize()
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return Timing.of([start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)])


def noisy(ratio, *timings) -> bool:
    """True when the spread of the timings behind ``ratio`` (a time ratio) is larger than the
    effect it reports, |ratio - 1|: the difference is not measured, whatever its size."""
    spread = sum(getattr(t, "spread", 0.0) for t in timings)
    return ratio is None or not math.isfinite(spread) or spread > abs(ratio - 1.0)


def rotation(numel, dtype, device, cache_bytes):
    """Enough distinct random inputs that cycling through them overflows the last-level cache."""
    bytes_each = numel * torch.tensor([], dtype=dtype).element_size()
    count = int(min(256, max(2, 3 * cache_bytes // max(bytes_each, 1) + 1)))
    generator = torch.Generator(device=device).manual_seed(numel)
    return [torch.randn(numel, device=device, dtype=dtype, generator=generator) for _ in range(count)]


def cycle(items):
    """A function returning the next of items on each call, round and round."""
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


def saved_bytes(fn, *args, exclude=()):
    """Bytes of the distinct storages autograd keeps for backward of fn(*args), leaving out
    the storages of the tensors in ``exclude`` (a model's parameters, to count activations)."""
    storages = {}
    excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(tensor):
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in excluded:
                storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def describe_device(device):
    """The device in words, with the versions that set its numbers."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return (
        f"CPU {platform.processor() or platform.machine()} with {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )


def _git(*args):
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance(device):
    """Where a results file's numbers come from: commit, dirty tree, versions, device, date."""
    from fused_dropout import _C

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "dirty": None if status is None else bool(status),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": describe_device(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_loops": _C.cpu_loops,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def provenance_line(prov):
    """The provenance as one markdown line, for the top of a results.md."""
    tree = (
        "unknown tree" if prov["commit"] is None else f"commit {prov['commit']}" + (" (dirty)" if prov["dirty"] else "")
    )
    return f"_{tree}; {prov['device']}; {prov['date']}; `{prov['command']}`_"


def write_results(out, prov, table, results, csv_keys=None, extra=None):
    """results.md (provenance line, then table), results.json (provenance, extra, results)
    and, given csv_keys, results.csv, in folder out. Returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(provenance_line(prov) + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps({"provenance": prov, **(extra or {}), "results": results}, indent=1))
    if csv_keys:
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["commit", "dirty", *csv_keys])
            writer.writeheader()
            for row in results:
                writer.writerow(
                    {"commit": prov["commit"], "dirty": prov["dirty"], **{k: row.get(k, "") for k in csv_keys}}
                )
    return out


def progress_bar(total, quiet, unit="size"):
    """A progress bar with rate and ETA on a terminal, or None (CI, logs, --quiet)."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, dynamic_ncols=True)
