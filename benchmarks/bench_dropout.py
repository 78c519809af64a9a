#!/usr/bin/env python
"""Dropout throughput: fused_dropout against torch.nn.functional.dropout (eager and
torch.compile'd) and the copy ceiling, side by side in one run on one device.

For each dtype and size it times forward, backward (through autograd, and the backward op
alone) and forward+backward with CUDA events around calls issued back to back (or a host
clock on CPU, where the work is synchronous) after warm-up, takes the median of
many runs, and rotates through several inputs so that caches do not flatter small sizes.
GB/s counts the bytes dropout must move: the input read and the output written per pass
(forward: x -> y; backward: grad_y -> grad_x), for every variant alike, so GB/s ratios are
time ratios. "copy" is x.clone(): the same read, write and allocation with no dropout.
Further rows: residual + dropout(x + bias) ("add: ..."), and dropout of images in
channels_last memory ("channels_last: ...", the strided kernel) and channel-wise dropout2d
("dropout2d: ...", the row-shared kernel on CUDA), each with a copy of its own layout.

Writes results.md (the table), results.csv, results.json and gbps.png to --out.

    python benchmarks/bench_dropout.py                  # CUDA when present, else CPU
    python benchmarks/bench_dropout.py --quick          # a smoke run (CI)
"""

import argparse
import csv
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fused_dropout
from fused_dropout import ops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        choices=list(DTYPES),
        help="(default: float32 float16 bfloat16; with --quick float32)",
    )
    parser.add_argument(
        "--log2-sizes",
        type=int,
        nargs="+",
        default=None,
        help="sizes as powers of two (default: 16 18 ... 28 on CUDA, 16 ... 24 on the CPU; with --quick 16 20)",
    )
    parser.add_argument("--p", type=float, default=0.5, help="drop probability")
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed runs per measurement, of which the median (default: 50 on CUDA, 11 on the CPU; with --quick 5)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile'd F.dropout")
    parser.add_argument("--no-mlp", action="store_true", help="skip the deep-MLP memory measurement")
    parser.add_argument("--no-add", action="store_true", help="skip the dropout_add comparison")
    parser.add_argument("--no-layouts", action="store_true", help="skip channels_last and dropout2d")
    parser.add_argument("--no-family", action="store_true", help="skip act_dropout, drop_path_add, alpha_dropout")
    parser.add_argument("--quick", action="store_true", help="few sizes and runs: a smoke test")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", default="runs/bench_dropout", help="output folder")
    return parser.parse_args(argv)


class Timer:
    """Median seconds of fn() over reps runs after warm-up."""

    def __init__(self, device, reps, warmup):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
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
            times = [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
        else:
            for _ in range(self.reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return statistics.median(times)


def saved_bytes(fn, x):
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return total


def rotation(numel, dtype, device, cache_bytes):
    """Enough distinct inputs that cycling through them overflows the last-level cache."""
    bytes_each = numel * torch.tensor([], dtype=dtype).element_size()
    count = int(min(256, max(2, 3 * cache_bytes // max(bytes_each, 1) + 1)))
    generator = torch.Generator(device=device).manual_seed(numel)
    return [torch.randn(numel, device=device, dtype=dtype, generator=generator) for _ in range(count)]


def cycle(items):
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


def result_row(dtype, numel, variant, direction, seconds, counted_bytes, copy_seconds=None, saved_bytes=None):
    """One row of the results: time, GB/s of the counted bytes, and % of a copy's speed
    (NaN where no copy of the same bytes was timed)."""
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "numel": numel,
        "variant": variant,
        "direction": direction,
        "ms": seconds * 1e3,
        "GB/s": counted_bytes / seconds / 1e9,
        "pct_of_copy": float("nan") if copy_seconds is None else 100.0 * copy_seconds / seconds,
        "saved_bytes": saved_bytes,
    }


def measure_size(numel, dtype, device, p, timer, variants, cache_bytes):
    inputs = rotation(numel, dtype, device, cache_bytes)
    leaves = [x.clone().requires_grad_(True) for x in inputs[:2]]
    grad = torch.randn_like(inputs[0])
    next_x, next_leaf = cycle(inputs), cycle(leaves)
    es = inputs[0].element_size()
    pass_bytes = 2 * numel * es
    rows = {}
    copy_time = timer(lambda: next_x().clone())
    rows["copy"] = {"forward": copy_time}
    if device.type == "cpu":
        rows["mul(x, 2.0)"] = {"forward": timer(lambda: torch.mul(next_x(), 2.0))}
    for name, fn in variants.items():
        fwd = timer(lambda: fn(next_x()))
        # Backward alone: the graph is built once per input, then only its backward is timed.
        graphs = [(leaf, fn(leaf)) for leaf in leaves]
        next_graph = cycle(graphs)

        def backward():
            leaf, y = next_graph()
            return torch.autograd.grad(y, leaf, grad, retain_graph=True)

        bwd = timer(backward)

        def forward_backward():
            leaf = next_leaf()
            return torch.autograd.grad(fn(leaf), leaf, grad)

        fwd_bwd = timer(forward_backward)
        rows[name] = {
            "forward": fwd,
            "backward": bwd,
            "forward+backward": fwd_bwd,
            "saved_bytes": saved_bytes(fn, leaves[0]),
        }
        del graphs
    # The backward ops alone, outside the autograd engine (whose own cost is a fixed tens of
    # microseconds per call): PyTorch's mask multiply against this library's mask replay.
    backward_ops = {
        "F.dropout": (
            torch.ops.aten.native_dropout(inputs[0], p, True)[1],
            lambda g, mask: torch.ops.aten.native_dropout_backward(g, mask, 1.0 / (1.0 - p)),
        ),
        "fused_dropout": (ops.dropout(inputs[0], p)[1], lambda g, state: ops.dropout_replay(g, state, p)),
    }
    for name, (saved, backward_op) in backward_ops.items():
        if name in rows:
            rows[name]["backward op"] = timer(lambda: backward_op(next_x(), saved))
    results = []
    for name, times in rows.items():
        for direction, seconds in times.items():
            if direction == "saved_bytes":
                continue
            passes = 2 if direction == "forward+backward" else 1
            results.append(
                result_row(
                    dtype,
                    numel,
                    name,
                    direction,
                    seconds,
                    pass_bytes * passes,
                    copy_time * passes,
                    times.get("saved_bytes"),
                )
            )
    # Ratios to the PyTorch variants, measured in this same run.
    for entry in results:
        for ref in ("F.dropout", "compiled F.dropout"):
            match = [r for r in results if r["variant"] == ref and r["direction"] == entry["direction"]]
            if match and entry["variant"] == "fused_dropout":
                entry[f"speedup_vs_{ref}"] = match[0]["ms"] / entry["ms"]
    return results


def measure_dropout_add(numel, dtype, device, p, timer, compile_too, cache_bytes):
    """residual + dropout(x + bias), as a transformer block's bias-dropout-add: eager
    PyTorch ops, the same compiled, and fused_dropout.dropout_add. Counted bytes: x and
    residual read, the output written (the bias is one row)."""
    width = 1024
    rows_count = max(1, numel // width)
    shape = (rows_count, width)
    inputs = rotation(rows_count * width, dtype, device, cache_bytes)
    inputs = [t.view(shape) for t in inputs]
    bias = torch.randn(width, device=device, dtype=dtype)
    next_x, next_residual = cycle(inputs), cycle(inputs[1:] + inputs[:1])

    def eager(x, r):
        return r + F.dropout(x + bias, p, training=True)

    variants = {"add: eager": eager, "add: fused_dropout": lambda x, r: fused_dropout.dropout_add(x, r, p, bias=bias)}
    if compile_too:
        variants["add: compiled"] = torch.compile(eager, dynamic=False)
    es = inputs[0].element_size()
    counted = 3 * rows_count * width * es
    results = []
    for name, fn in variants.items():
        seconds = timer(lambda: fn(next_x(), next_residual()))
        results.append(result_row(dtype, rows_count * width, name, "forward", seconds, counted))
    fused = [r for r in results if r["variant"] == "add: fused_dropout"][0]
    for ref in ("eager", "compiled"):
        match = [r for r in results if r["variant"] == f"add: {ref}"]
        if match:
            fused[f"speedup_vs_{'F.dropout' if ref == 'eager' else 'compiled F.dropout'}"] = (
                match[0]["ms"] / fused["ms"]
            )
    return results


def measure_family(numel, dtype, device, p, timer, compile_too, cache_bytes):
    """The rest of the family against the PyTorch compositions they replace, eager and
    compiled, forward and forward+backward (gradient of the input):
    - gelu: dropout(gelu(x + b)) on (numel / 1024, 1024) rows with a bias;
    - drop_path+add: residual + stochastic_depth(x, "row"), 1024 elements per sample;
    - alpha: alpha_dropout(x).
    Counted bytes are the fewest a fused pass moves: forward reads its inputs and writes the
    output; backward reads the gradient (and gelu's saved input) and writes the input's
    gradient. % of copy compares with a copy that moves the same bytes."""
    width = 1024
    shape = (max(1, numel // width), width)
    flat = rotation(shape[0] * width, dtype, device, cache_bytes)
    inputs = [t.view(shape) for t in flat]
    leaves = [t.clone().requires_grad_(True) for t in inputs[:2]]
    bias = torch.randn(width, device=device, dtype=dtype)
    next_x, next_other, next_leaf = cycle(inputs), cycle(inputs[1:] + inputs[:1]), cycle(leaves)
    grad = torch.randn_like(inputs[0])
    es = inputs[0].element_size()
    n = inputs[0].numel()
    copy_time = timer(lambda: next_x().clone())  # 2n elements moved

    def stochastic_depth_eager(x, r):
        try:
            from torchvision.ops import stochastic_depth
        except ImportError:  # torchvision's formula, for machines without it
            keep = torch.empty((x.shape[0], 1), device=x.device, dtype=x.dtype).bernoulli_(1 - p).div_(1 - p)
            return r + x * keep
        return r + stochastic_depth(x, p, "row", training=True)

    forms = {
        "gelu": (
            lambda x, r: F.dropout(F.gelu(x + bias), p, training=True),
            lambda x, r: fused_dropout.act_dropout(x, p, activation="gelu", bias=bias),
            (2, 3),
        ),
        "drop_path+add": (
            stochastic_depth_eager,
            lambda x, r: fused_dropout.drop_path_add(x, r, p),
            (3, 2),
        ),
        "alpha": (
            lambda x, r: F.alpha_dropout(x, p, training=True),
            lambda x, r: fused_dropout.alpha_dropout(x, p, training=True),
            (2, 2),
        ),
    }
    results = []
    for form, (eager, fused, (fwd_passes, bwd_passes)) in forms.items():
        variants = {"eager": eager, "fused_dropout": fused}
        if compile_too:
            variants["compiled"] = torch.compile(eager, dynamic=False)
        times = {}
        for name, fn in variants.items():
            forward = timer(lambda: fn(next_x(), next_other()))

            def forward_backward():
                leaf = next_leaf()
                return torch.autograd.grad(fn(leaf, next_other()), leaf, grad)

            times[name] = {"forward": forward, "forward+backward": timer(forward_backward)}
        for name, by_direction in times.items():
            for direction, seconds in by_direction.items():
                passes = fwd_passes + (bwd_passes if direction == "forward+backward" else 0)
                row = result_row(
                    dtype, n, f"{form}: {name}", direction, seconds, passes * n * es, copy_time * passes / 2
                )
                if name == "fused_dropout":
                    row["speedup_vs_F.dropout"] = by_direction_ratio(times, "eager", direction, seconds)
                    row["speedup_vs_compiled F.dropout"] = by_direction_ratio(times, "compiled", direction, seconds)
                results.append(row)
    return results


def by_direction_ratio(times, name, direction, seconds):
    return times[name][direction] / seconds if name in times else None


def measure_layouts(numel, dtype, device, p, timer, cache_bytes):
    """Forward on (N, 64, 32, 32) images: dropout of a channels_last tensor (the strided
    kernel: the mask follows the logical index, not memory order) and channel-wise dropout2d
    (the row-shared kernel on CUDA), each against PyTorch and a copy of the same layout."""
    channels, height, width = 64, 32, 32
    batch = max(1, numel // (channels * height * width))
    shape = (batch, channels, height, width)
    flat = rotation(batch * channels * height * width, dtype, device, cache_bytes)
    images = [t.view(shape) for t in flat]
    last = [t.contiguous(memory_format=torch.channels_last) for t in images]
    next_image, next_last = cycle(images), cycle(last)
    cases = {
        "channels_last": (
            next_last,
            lambda x: F.dropout(x, p, training=True),
            lambda x: fused_dropout.dropout(x, p, training=True),
        ),
        "dropout2d": (
            next_image,
            lambda x: F.dropout2d(x, p, training=True),
            lambda x: fused_dropout.dropout2d(x, p, training=True),
        ),
    }
    counted = 2 * images[0].numel() * images[0].element_size()
    results = []
    for case, (next_input, theirs, ours) in cases.items():
        copy_time = timer(lambda: next_input().clone())
        times = {
            "copy": copy_time,
            "F.dropout": timer(lambda: theirs(next_input())),
            "fused_dropout": timer(lambda: ours(next_input())),
        }
        for name, seconds in times.items():
            results.append(
                result_row(dtype, images[0].numel(), f"{case}: {name}", "forward", seconds, counted, copy_time)
            )
        results[-1]["speedup_vs_F.dropout"] = times["F.dropout"] / times["fused_dropout"]
    return results


def deep_mlp_peak_memory(device, dropout_cls, width=4096, depth=8, batch=8192):
    """Peak memory of one training step of a deep MLP with dropout after every layer."""
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU(), dropout_cls(0.1)]
    model = nn.Sequential(*layers).to(device)
    x = torch.randn(batch, width, device=device)
    model(x).sum().backward()  # warm-up: allocator pools, cuBLAS workspaces
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    model(x).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, x
    torch.cuda.empty_cache()
    return peak


def describe(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return (
        f"CPU {platform.processor() or platform.machine()} with {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )


def fmt_size(numel):
    return f"2^{numel.bit_length() - 1}" if numel & (numel - 1) == 0 else str(numel)


def markdown(results, header):
    def cell(value, fmt):
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)

    lines = [
        header,
        "",
        "| dtype | size | direction | variant | ms | GB/s | % of copy | vs F.dropout | vs compiled | saved bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['dtype']} | {fmt_size(r['numel'])} | {r['direction']} | {r['variant']} | {r['ms']:.3f} | "
            f"{r['GB/s']:.1f} | {cell(r['pct_of_copy'], '{:.0f}%')} | "
            f"{cell(r.get('speedup_vs_F.dropout'), '{:.2f}x')} | "
            f"{cell(r.get('speedup_vs_compiled F.dropout'), '{:.2f}x')} | {cell(r['saved_bytes'], '{}')} |"
        )
    return "\n".join(lines)


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in results})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for variant in dict.fromkeys(r["variant"] for r in results):
            points = [
                r
                for r in results
                if r["dtype"] == dtype
                and r["variant"] == variant
                and r["direction"] == "forward"
                and ": " not in variant
            ]  # the flat-tensor rows
            if points:
                ax.plot([r["numel"] for r in points], [r["GB/s"] for r in points], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements")
        ax.set_ylabel("forward GB/s (read + write)")
        ax.set_title(f"{dtype}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_bar(total, quiet):
    """A progress bar with rate and ETA on a terminal, or None (CI, logs, --quiet)."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="size", dynamic_ncols=True)


def quiet_cpu_compile_warning():
    # torch.compile on a machine without a GPU logs "No CUDA runtime is found, using
    # CUDA_HOME=..." from torch.utils.cpp_extension in the middle of the tables.
    import logging

    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv=None):
    args = parse_args(argv)
    quiet_cpu_compile_warning()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not fused_dropout.has_cuda_kernels():
        sys.exit("bench_dropout: this build of fused_dropout has no CUDA kernels")
    cuda = device.type == "cuda"
    if args.quick:
        sizes = [2**k for k in (args.log2_sizes or (16, 20))]
        dtypes = args.dtypes or ["float32"]
        reps, warmup = args.reps or 5, 2
    else:
        sizes = [2**k for k in (args.log2_sizes or (range(16, 29, 2) if cuda else range(16, 25, 2)))]
        dtypes = args.dtypes or ["float32", "float16", "bfloat16"]
        reps, warmup = args.reps or (50 if cuda else 11), (10 if cuda else 3)
    if cuda:
        free = torch.cuda.mem_get_info()[0]
        cache_bytes = 50 * 2**20  # L2 of an H100 / H200
    else:
        cache_bytes = 64 * 2**20
    timer = Timer(device, reps, warmup)
    p = args.p
    variants = {
        "F.dropout": lambda x: F.dropout(x, p, training=True),
        "fused_dropout": lambda x: fused_dropout.dropout(x, p, training=True),
    }
    if not args.no_compile:
        # One compiled graph per dtype, size and requires_grad: allow them all, or dynamo
        # would silently fall back to eager after its default limit of 8.
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, 256)
        variants["compiled F.dropout"] = torch.compile(lambda x: F.dropout(x, p, training=True), dynamic=False)
    header = f"Dropout p={p} on {describe(device)}, {time.strftime('%Y-%m-%d')}; median of {reps} runs"
    print(header, flush=True)
    results = []
    bar = progress_bar(len(dtypes) * len(sizes), args.quiet)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for numel in sizes:
            if bar is not None:
                bar.set_description(f"{dtype_name} {fmt_size(numel)}")
            if cuda and numel * torch.tensor([], dtype=dtype).element_size() * 24 > free:
                print(f"  skipping {dtype_name} 2^{numel.bit_length() - 1}: not enough GPU memory", flush=True)
                continue
            rows = measure_size(numel, dtype, device, p, timer, variants, cache_bytes)
            if not args.no_add:
                rows += measure_dropout_add(numel, dtype, device, p, timer, not args.no_compile, cache_bytes)
            if not args.no_layouts:
                rows += measure_layouts(numel, dtype, device, p, timer, cache_bytes)
            if not args.no_family:
                rows += measure_family(numel, dtype, device, p, timer, not args.no_compile, cache_bytes)
            results += rows
            ours = [r for r in rows if r["variant"] == "fused_dropout" and r["direction"] == "forward"][0]
            (bar.write if bar is not None else print)(
                f"  {dtype_name} {fmt_size(numel)}: forward {ours['ms']:.3f} ms, {ours['pct_of_copy']:.0f}% of copy, "
                f"{ours.get('speedup_vs_F.dropout', 0):.2f}x F.dropout",
                flush=True,
            )
            if bar is not None:
                bar.update()
            if cuda:
                torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    memory = None
    if cuda and not args.no_mlp:
        memory = {
            "nn.Dropout": deep_mlp_peak_memory(device, nn.Dropout),
            "FusedDropout": deep_mlp_peak_memory(device, fused_dropout.FusedDropout),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, header)
    if memory:
        table += (
            "\n\nPeak memory of one training step, 8 x Linear(4096, 4096) + ReLU + dropout(0.1), batch 8192: "
            + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in memory.items())
            + f" (saved {(memory['nn.Dropout'] - memory['FusedDropout']) / 2**20:.0f} MiB)"
        )
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "device": describe(device),
                "date": time.strftime("%Y-%m-%d"),
                "p": p,
                "reps": reps,
                "results": results,
                "deep_mlp_peak_memory_bytes": memory,
            },
            indent=2,
        )
    )
    with open(out / "results.csv", "w", newline="") as f:
        keys = [
            "dtype",
            "numel",
            "variant",
            "direction",
            "ms",
            "GB/s",
            "pct_of_copy",
            "saved_bytes",
            "speedup_vs_F.dropout",
            "speedup_vs_compiled F.dropout",
        ]
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in results:
            writer.writerow({k: r.get(k, "") for k in keys})
    plot(results, out / "gbps.png", header)
    print()
    print(table)
    print(f"\nWrote {out}/results.md, results.csv, results.json and gbps.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
