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
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fused_dropout
from fused_dropout import ops

from common import (
    DefaultsHelpFormatter,
    Timer,
    cycle,
    describe_device,
    noisy,
    progress_bar,
    provenance,
    rotation,
    saved_bytes,
    write_results,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


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
    parser.add_argument("--no-flat", action="store_true", help="skip plain dropout of flat tensors")
    parser.add_argument("--no-mlp", action="store_true", help="skip the deep-MLP memory measurement")
    parser.add_argument("--no-add", action="store_true", help="skip the dropout_add comparison")
    parser.add_argument("--no-layouts", action="store_true", help="skip channels_last and dropout2d")
    parser.add_argument("--no-family", action="store_true", help="skip act_dropout, drop_path_add, alpha_dropout")
    parser.add_argument("--no-norm", action="store_true", help="skip dropout_add_layer_norm and dropout_add_rms_norm")
    parser.add_argument(
        "--norm-widths",
        type=int,
        nargs="+",
        default=None,
        help="hidden sizes of the norm rows (default: 768 4096; with --quick 768)",
    )
    parser.add_argument("--quick", action="store_true", help="few sizes and runs: a smoke test")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", default="runs/bench_dropout", help="output folder")
    return parser.parse_args(argv)


def result_row(dtype, numel, variant, direction, seconds, counted_bytes, copy_seconds=None, saved=None):
    """One row of the results: time (and the spread of its runs), GB/s of the counted bytes,
    and % of a copy's speed (NaN where no copy of the same bytes was timed), flagged noisy
    where the spread of the two timings is larger than the difference it reports."""
    row = {
        "dtype": str(dtype).replace("torch.", ""),
        "numel": numel,
        "variant": variant,
        "direction": direction,
        "ms": seconds * 1e3,
        "spread": getattr(seconds, "spread", float("nan")),
        "GB/s": counted_bytes / seconds / 1e9,
        "pct_of_copy": float("nan") if copy_seconds is None else 100.0 * copy_seconds / seconds,
        "saved_bytes": saved,
    }
    if copy_seconds is not None and variant.split(": ")[-1] != "copy":
        row["pct_of_copy_noisy"] = noisy(copy_seconds / seconds, copy_seconds, seconds)
    return row


def add_speedup(row, reference, label):
    """The reference row's time over this row's, as speedup_vs_<label>, with its noise flag."""
    if reference is None:
        return
    ratio = reference["ms"] / row["ms"]
    row[f"speedup_vs_{label}"] = ratio
    row[f"speedup_vs_{label}_noisy"] = row["spread"] + reference["spread"] > abs(ratio - 1.0)


def time_directions(fn, timer, next_x, leaves, grad):
    """Forward, backward alone (the graph built once per input, then only its backward timed)
    and forward+backward of fn, and the bytes autograd saves for its backward."""
    forward = timer(lambda: fn(next_x()))
    graphs = [(leaf, fn(leaf)) for leaf in leaves]
    next_graph, next_leaf = cycle(graphs), cycle(leaves)

    def backward():
        leaf, y = next_graph()
        return torch.autograd.grad(y, leaf, grad, retain_graph=True)

    def forward_backward():
        leaf = next_leaf()
        return torch.autograd.grad(fn(leaf), leaf, grad)

    return {
        "forward": forward,
        "backward": timer(backward),
        "forward+backward": timer(forward_backward),
        "saved_bytes": saved_bytes(fn, leaves[0]),
    }


def time_backward_ops(x, p, timer, next_x):
    """The backward ops alone, outside the autograd engine (whose own cost is a fixed tens of
    microseconds per call): PyTorch's mask multiply against this library's mask replay."""
    mask = torch.ops.aten.native_dropout(x, p, True)[1]
    state = ops.dropout(x, p)[1]
    return {
        "F.dropout": timer(lambda: torch.ops.aten.native_dropout_backward(next_x(), mask, 1.0 / (1.0 - p))),
        "fused_dropout": timer(lambda: ops.dropout_replay(next_x(), state, p)),
    }


def measure_size(numel, dtype, device, p, timer, variants, cache_bytes):
    """Flat tensors of numel elements: copy, (CPU) a multiply, and every variant forward,
    backward, forward+backward and the backward op alone."""
    inputs = rotation(numel, dtype, device, cache_bytes)
    leaves = [x.clone().requires_grad_(True) for x in inputs[:2]]
    grad = torch.randn_like(inputs[0])
    next_x = cycle(inputs)
    pass_bytes = 2 * numel * inputs[0].element_size()
    copy_time = timer(lambda: next_x().clone())
    rows = {"copy": {"forward": copy_time}}
    if device.type == "cpu":
        rows["mul(x, 2.0)"] = {"forward": timer(lambda: torch.mul(next_x(), 2.0))}
    for name, fn in variants.items():
        rows[name] = time_directions(fn, timer, next_x, leaves, grad)
    for name, seconds in time_backward_ops(inputs[0], p, timer, next_x).items():
        rows[name]["backward op"] = seconds
    results = []
    for name, times in rows.items():
        for direction, seconds in times.items():
            if direction != "saved_bytes":
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
    for entry in (r for r in results if r["variant"] == "fused_dropout"):
        for ref in ("F.dropout", "compiled F.dropout"):
            match = [r for r in results if r["variant"] == ref and r["direction"] == entry["direction"]]
            add_speedup(entry, match[0] if match else None, ref)
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
    if es == 2:
        # The mixed-precision residual stream: a float32 residual beside the 2-byte branch, the
        # sum in float32 (x read, the residual read and the output written in float32).
        wide = [t.float() for t in inputs]
        next_wide = cycle(wide)
        mixed = {
            "add, float32 residual: eager": eager,
            # The composition of the fused dropout and ATen's promoting add, which the one
            # pass replaces.
            "add, float32 residual: two passes": lambda x, r: r + fused_dropout.dropout(x + bias, p),
            "add, float32 residual: fused_dropout": variants["add: fused_dropout"],
        }
        if compile_too:
            mixed["add, float32 residual: compiled"] = torch.compile(eager, dynamic=False)
        n = rows_count * width
        for name, fn in mixed.items():
            seconds = timer(lambda: fn(next_x(), next_wide()))
            results.append(result_row(dtype, n, name, "forward", seconds, n * (es + 8)))
        results += time_float_residual_backward(eager, (next_x, next_wide), inputs, p, timer, dtype)
    for prefix in ("add", "add, float32 residual"):
        for direction in ("forward", "forward+backward", "backward op"):
            fused = [r for r in results if r["variant"] == f"{prefix}: fused_dropout" and r["direction"] == direction]
            for ref, label in (("eager", "F.dropout"), ("compiled", "compiled F.dropout")):
                match = [r for r in results if r["variant"] == f"{prefix}: {ref}" and r["direction"] == direction]
                if fused:
                    add_speedup(fused[0], match[0] if match else None, label)
    return results


def time_float_residual_backward(eager, nexts, inputs, p, timer, dtype):
    """The backward of dropout_add beside a float32 residual: the input's gradient is the
    float32 output gradient converted to the 2-byte dtype and replayed through the mask.
    Forward+backward through autograd (the gradient of x), eager against fused; and the
    backward op alone: eager's conversion then mask multiply, the conversion then
    dropout_replay (two passes), and dropout_replay with dtype= (one pass). Counted bytes of the
    backward: the float32 gradient read, the 2-byte gradient written."""
    next_x, next_wide = nexts
    x = inputs[0]
    n, es = x.numel(), x.element_size()
    leaves = [t.clone().requires_grad_(True) for t in inputs[:2]]
    next_leaf = cycle(leaves)
    grads = [torch.randn(x.shape, device=x.device, dtype=torch.float32) for _ in range(2)]
    next_grad = cycle(grads)
    mask = torch.ops.aten.native_dropout(x, p, True)[1]
    state = ops.dropout(x, p)[1]
    variants = {"eager": eager, "fused_dropout": lambda t, r: fused_dropout.dropout_add(t, r, p)}

    def forward_backward(fn):
        leaf = next_leaf()
        return torch.autograd.grad(fn(leaf, next_wide()), leaf, next_grad())

    rows = []
    for name, fn in variants.items():
        seconds = timer(lambda: forward_backward(fn))  # noqa: B023 (timed here, in this iteration)
        moved = n * (2 * es + 12)  # forward: x, residual, output; backward: gradient in and out
        rows.append(result_row(dtype, n, f"add, float32 residual: {name}", "forward+backward", seconds, moved))
    backward_ops = {
        "eager": lambda: torch.ops.aten.native_dropout_backward(next_grad().to(dtype), mask, 1.0 / (1.0 - p)),
        "two passes": lambda: ops.dropout_replay(next_grad().to(dtype), state, p),
        "fused_dropout": lambda: ops.dropout_replay(next_grad(), state, p, dtype=dtype),
    }
    for name, fn in backward_ops.items():
        rows.append(result_row(dtype, n, f"add, float32 residual: {name}", "backward op", timer(fn), n * (4 + es)))
    return rows


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
    for form, (eager, fused, passes) in forms.items():
        variants = {"eager": eager, "fused_dropout": fused}
        if compile_too:
            variants["compiled"] = torch.compile(eager, dynamic=False)
        results += time_form(form, variants, passes, timer, (next_x, next_other, next_leaf), grad, copy_time, dtype)
    return results


def time_form(form, variants, passes, timer, nexts, grad, copy_time, dtype):
    """Rows of one form of the family: each variant forward and forward+backward, the fused
    one with its ratios to eager and compiled. passes: (forward, backward) passes over n
    elements that a fused kernel moves."""
    next_x, next_other, next_leaf = nexts
    fwd_passes, bwd_passes = passes
    x = next_x()
    n, es = x.numel(), x.element_size()
    rows = {}
    for name, fn in variants.items():

        def forward_backward():
            leaf = next_leaf()
            return torch.autograd.grad(fn(leaf, next_other()), leaf, grad)

        timings = {"forward": timer(lambda: fn(next_x(), next_other())), "forward+backward": timer(forward_backward)}
        for direction, seconds in timings.items():
            moved = fwd_passes + (bwd_passes if direction == "forward+backward" else 0)
            rows[name, direction] = result_row(
                dtype, n, f"{form}: {name}", direction, seconds, moved * n * es, copy_time * moved / 2
            )
    for (name, direction), row in rows.items():
        if name == "fused_dropout":
            add_speedup(row, rows.get(("eager", direction)), "F.dropout")
            add_speedup(row, rows.get(("compiled", direction)), "compiled F.dropout")
    return list(rows.values())


def measure_norm(numel, dtype, device, p, timer, compile_too, cache_bytes, width):
    """h = residual + dropout(x), then LayerNorm / RMSNorm of h over rows of `width`: the
    eager composition, the same compiled and the fused op, forward and forward+backward (the
    gradient of x). Counted bytes are the memory floor of a fused pass: forward reads x and the
    residual and writes the output and h; backward reads the output's gradient and h and writes
    the gradients of x and of the residual (four passes each way)."""
    shape = (max(1, numel // width), width)
    flat = rotation(shape[0] * width, dtype, device, cache_bytes)
    inputs = [t.view(shape) for t in flat]
    leaves = [t.clone().requires_grad_(True) for t in inputs[:2]]
    weight, bias = torch.randn(width, device=device, dtype=dtype), torch.randn(width, device=device, dtype=dtype)
    next_x, next_residual, next_leaf = cycle(inputs), cycle(inputs[1:] + inputs[:1]), cycle(leaves)
    grad = torch.randn_like(inputs[0])
    copy_time = timer(lambda: next_x().clone())  # 2n elements moved
    forms = {
        f"add+layer_norm {width}": (
            lambda x, r: F.layer_norm(r + F.dropout(x, p, training=True), (width,), weight, bias),
            lambda x, r: fused_dropout.dropout_add_layer_norm(x, r, weight, bias, p),
        ),
        f"add+rms_norm {width}": (
            lambda x, r: F.rms_norm(r + F.dropout(x, p, training=True), (width,), weight),
            lambda x, r: fused_dropout.dropout_add_rms_norm(x, r, weight, p),
        ),
    }
    flash = flash_attn_norms(p, weight, bias) if device.type == "cuda" else None
    results = []
    for form, (eager, fused) in forms.items():
        variants = {"eager": eager, "fused_dropout": fused}
        if compile_too:
            variants["compiled"] = torch.compile(eager, dynamic=False)
        if flash is not None:
            variants["flash_attn"] = flash["rms_norm" if "rms_norm" in form else "layer_norm"]
        nexts = (next_x, next_residual, next_leaf)
        rows = time_form(form, variants, (4, 4), timer, nexts, grad, copy_time, dtype)
        by_variant = {(r["variant"], r["direction"]): r for r in rows}
        for (variant, direction), row in by_variant.items():
            if variant == f"{form}: fused_dropout":
                add_speedup(row, by_variant.get((f"{form}: flash_attn", direction)), "flash_attn")
        results += rows
    return results


def flash_attn_norms(p, weight, bias):
    """flash-attention's fused dropout + add + norm (flash_attn/ops/triton/layer_norm.py) where
    it is installed, as the reference fused form; else None."""
    try:
        from flash_attn.ops.triton.layer_norm import layer_norm_fn, rms_norm_fn
    except Exception:  # not installed, or its Triton does not load here
        return None
    return {
        "layer_norm": lambda x, r: layer_norm_fn(x, weight, bias, residual=r, eps=1e-5, dropout_p=p),
        "rms_norm": lambda x, r: rms_norm_fn(x, weight, None, residual=r, eps=1e-5, dropout_p=p),
    }


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
        add_speedup(results[-1], results[-2], "F.dropout")
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


def fmt_size(numel):
    return f"2^{numel.bit_length() - 1}" if numel & (numel - 1) == 0 else str(numel)


def markdown(results, header):
    def cell(value, fmt, flagged=False):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        return fmt.format(value) + (" (noisy)" if flagged else "")

    lines = [
        header,
        "",
        "| dtype | size | direction | variant | ms | spread | GB/s | % of copy | vs F.dropout | vs compiled "
        "| saved bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        vs_eager, vs_compiled = "speedup_vs_F.dropout", "speedup_vs_compiled F.dropout"
        lines.append(
            f"| {r['dtype']} | {fmt_size(r['numel'])} | {r['direction']} | {r['variant']} | {r['ms']:.3f} | "
            f"{cell(r['spread'], '{:.0%}')} | {r['GB/s']:.1f} | "
            f"{cell(r['pct_of_copy'], '{:.0f}%', r.get('pct_of_copy_noisy'))} | "
            f"{cell(r.get(vs_eager), '{:.2f}x', r.get(vs_eager + '_noisy'))} | "
            f"{cell(r.get(vs_compiled), '{:.2f}x', r.get(vs_compiled + '_noisy'))} | {cell(r['saved_bytes'], '{}')} |"
        )
    lines += [
        "",
        "spread: interquartile range of the timed runs over their median. (noisy): the spreads of the two "
        "timings behind a ratio add up to more than the effect it reports; the ratio is not a measured difference.",
    ]
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


def quiet_cpu_compile_warning():
    # torch.compile on a machine without a GPU logs "No CUDA runtime is found, using
    # CUDA_HOME=..." from torch.utils.cpp_extension in the middle of the tables.
    import logging

    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def run_settings(args, cuda):
    """(sizes, dtypes, reps, warmup) from the command line and its defaults."""
    if args.quick:
        sizes = [2**k for k in (args.log2_sizes or (16, 20))]
        return sizes, args.dtypes or ["float32"], args.reps or 5, 2
    sizes = [2**k for k in (args.log2_sizes or (range(16, 29, 2) if cuda else range(16, 25, 2)))]
    return (
        sizes,
        args.dtypes or ["float32", "float16", "bfloat16"],
        args.reps or (50 if cuda else 11),
        (10 if cuda else 3),
    )


def dropout_variants(p, compile_too):
    variants = {
        "F.dropout": lambda x: F.dropout(x, p, training=True),
        "fused_dropout": lambda x: fused_dropout.dropout(x, p, training=True),
    }
    if compile_too:
        # One compiled graph per dtype, size and requires_grad: allow them all, or dynamo
        # would silently fall back to eager after its default limit of 8.
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, 256)
        variants["compiled F.dropout"] = torch.compile(lambda x: F.dropout(x, p, training=True), dynamic=False)
    return variants


def measure_all(args, device, sizes, dtypes, timer):
    """Every row of the run, size by size, with a line (or a progress bar) per size."""
    cuda = device.type == "cuda"
    cache_bytes = 50 * 2**20 if cuda else 64 * 2**20  # L2 of an H100 / H200; the CPU's last level
    free = torch.cuda.mem_get_info()[0] if cuda else None
    variants = dropout_variants(args.p, not args.no_compile)
    results = []
    bar = progress_bar(len(dtypes) * len(sizes), args.quiet)
    say = bar.write if bar is not None else print
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for numel in sizes:
            if bar is not None:
                bar.set_description(f"{dtype_name} {fmt_size(numel)}")
            if cuda and numel * torch.tensor([], dtype=dtype).element_size() * 24 > free:
                say(f"  skipping {dtype_name} 2^{numel.bit_length() - 1}: not enough GPU memory", flush=True)
                continue
            rows = [] if args.no_flat else measure_size(numel, dtype, device, args.p, timer, variants, cache_bytes)
            if not args.no_add:
                rows += measure_dropout_add(numel, dtype, device, args.p, timer, not args.no_compile, cache_bytes)
            if not args.no_layouts:
                rows += measure_layouts(numel, dtype, device, args.p, timer, cache_bytes)
            if not args.no_family:
                rows += measure_family(numel, dtype, device, args.p, timer, not args.no_compile, cache_bytes)
            if not args.no_norm:
                for width in args.norm_widths or ((768,) if args.quick else (768, 4096)):
                    rows += measure_norm(numel, dtype, device, args.p, timer, not args.no_compile, cache_bytes, width)
            results += rows
            for ours in (r for r in rows if r["variant"].endswith("fused_dropout") and r["direction"] == "forward"):
                flag = " (noisy)" if ours.get("speedup_vs_F.dropout_noisy") else ""
                say(
                    f"  {dtype_name} {fmt_size(numel)} {ours['variant']}: forward {ours['ms']:.3f} ms, "
                    f"{ours['pct_of_copy']:.0f}% of copy, {ours.get('speedup_vs_F.dropout', 0):.2f}x eager{flag}",
                    flush=True,
                )
            if bar is not None:
                bar.update()
            if cuda:
                torch.cuda.empty_cache()
    if bar is not None:
        bar.close()
    return results


CSV_KEYS = [
    "dtype",
    "numel",
    "variant",
    "direction",
    "ms",
    "spread",
    "GB/s",
    "pct_of_copy",
    "pct_of_copy_noisy",
    "saved_bytes",
    "speedup_vs_F.dropout",
    "speedup_vs_F.dropout_noisy",
    "speedup_vs_compiled F.dropout",
    "speedup_vs_compiled F.dropout_noisy",
]


def main(argv=None):
    args = parse_args(argv)
    quiet_cpu_compile_warning()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not fused_dropout.has_cuda_kernels():
        sys.exit("bench_dropout: this build of fused_dropout has no CUDA kernels")
    sizes, dtypes, reps, warmup = run_settings(args, device.type == "cuda")
    header = f"Dropout p={args.p} on {describe_device(device)}, {time.strftime('%Y-%m-%d')}; median of {reps} runs"
    print(header, flush=True)
    results = measure_all(args, device, sizes, dtypes, Timer(device, reps, warmup))
    memory = None
    if device.type == "cuda" and not args.no_mlp:
        memory = {
            "nn.Dropout": deep_mlp_peak_memory(device, nn.Dropout),
            "FusedDropout": deep_mlp_peak_memory(device, fused_dropout.FusedDropout),
        }
    table = markdown(results, header)
    if memory:
        table += (
            "\n\nPeak memory of one training step, 8 x Linear(4096, 4096) + ReLU + dropout(0.1), batch 8192: "
            + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in memory.items())
            + f" (saved {(memory['nn.Dropout'] - memory['FusedDropout']) / 2**20:.0f} MiB)"
        )
    prov = provenance(device)
    extra = {"p": args.p, "reps": reps, "deep_mlp_peak_memory_bytes": memory}
    out = write_results(args.out, prov, table, results, CSV_KEYS, extra)
    plot(results, out / "gbps.png", header)
    print()
    print(table)
    print(f"\nWrote {out}/results.md, results.csv, results.json and gbps.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
