"""The CUDA kernels' source, run on the CPU by tests/cuda_kernel_on_host.cpp and
tests/norm_kernel_on_host.cpp: their indexing is checked against the mask rule in every CI run,
not only on a GPU machine."""

import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]


def _build_and_run(name, tmp_path):
    """Compiles tests/<name>.cpp against csrc/ and torch's headers, runs it, returns its run."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    binary = tmp_path / name
    build = subprocess.run(
        [
            compiler,
            "-O1",
            "-std=c++20",
            "-pthread",
            f"-I{ROOT / 'csrc'}",
            *(f"-I{p}" for p in include_paths()),
            str(ROOT / "tests" / f"{name}.cpp"),
            "-o",
            str(binary),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run


def test_cuda_kernel_source_follows_the_rule(tmp_path):
    run = _build_and_run("cuda_kernel_on_host", tmp_path)
    # Both kernels ran, and every launch of every dtype agreed with the rule.
    reports = [line for line in run.stdout.splitlines() if "launches differ" in line]
    for kernel in ("row-major kernel", "row-shared kernel", "strided kernel"):
        assert any(line.startswith(kernel) for line in reports), run.stdout
    assert all(": 0 of " in line for line in reports), run.stdout
    # the launch plan's choice of kernel for a shared mask was taken as it is on a GPU, and
    # some strided cases went to the row-shared kernel.
    strided = [line for line in reports if line.startswith("strided kernel")]
    assert all(int(line.split("(")[1].split()[0]) > 0 for line in strided), run.stdout
    # A dropped sample's input was never read: its pages were unreadable.
    skips = [line for line in run.stdout.splitlines() if "rows dropped and not read" in line]
    assert len(skips) == 2 and all(line.endswith("output matches") for line in skips), run.stdout


def test_norm_kernel_source_follows_the_rule(tmp_path):
    # dropout_add_norm's CUDA kernel, each block's threads as host threads: h bit for bit,
    # the statistics and the output within the rounding of the sums, for every dtype it takes.
    run = _build_and_run("norm_kernel_on_host", tmp_path)
    reports = [line for line in run.stdout.splitlines() if line.startswith("norm kernel")]
    assert len(reports) == 4 and all(": 0 of " in line for line in reports), run.stdout
