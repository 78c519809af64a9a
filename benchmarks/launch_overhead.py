#!/usr/bin/env python
"""Host cost per dropout call at a small size, where launches and not bytes set the time:
F.dropout against fused_dropout for forward, backward and forward+backward. Calls are issued
back to back and the device is synchronised once at the end, so the figure is the rate at
which the host can issue them. Then a torch.profiler table of where one backward spends it.

    python benchmarks/launch_overhead.py [--device cuda] [--numel 65536]
"""

import argparse
import time

import torch
import torch.nn.functional as F

import fused_dropout

from common import provenance, provenance_line


def per_call_us(fn, device, calls=2000, rounds=5):
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--numel", type=int, default=2**16, help="elements per call")
    args = parser.parse_args()
    device = torch.device(args.device)
    x = torch.randn(args.numel, device=device)
    leaf = x.clone().requires_grad_(True)
    grad = torch.randn_like(x)
    variants = {"F.dropout": lambda t: F.dropout(t, 0.5), "fused_dropout": lambda t: fused_dropout.dropout(t, 0.5)}
    print(provenance_line(provenance(device)))
    print(
        f"host cost per call, {args.numel} float32 elements on {device} (best of 5 rounds of 2000 calls), "
        f"torch {torch.__version__}"
    )
    graphs = {name: fn(leaf) for name, fn in variants.items()}
    for name, fn in variants.items():
        y = graphs[name]
        fwd = per_call_us(lambda: fn(x), device)
        bwd = per_call_us(lambda: torch.autograd.grad(y, leaf, grad, retain_graph=True), device)
        both = per_call_us(lambda: torch.autograd.grad(fn(leaf), leaf, grad), device)
        print(f"  {name:14} forward {fwd:6.1f} us   backward {bwd:6.1f} us   forward+backward {both:6.1f} us")
    activities = [torch.profiler.ProfilerActivity.CPU]
    for name, y in graphs.items():
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(50):
                torch.autograd.grad(y, leaf, grad, retain_graph=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"\nbackward of {name}, 50 calls:")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
