#!/usr/bin/env python
"""Plant realistic bugs one at a time and report which ones the fast test suite misses.

Each mutant is one textual change to one file: the mask rule, the forms, the memory walk,
the autograd and vmap layer, the Python checks and replace_dropout. For each, the script
applies it to a scratch copy of the repository, builds the extension CPU-only (ninja
recompiles only what the change touches), runs the fast tests with -x, and restores the
file. A mutant is caught when some test fails; one that survives names a hole in the
suite. Run it before changing a kernel or a rule (docs/design.md, "Checking the tests").

    python tools/mutate.py                  # every mutant
    python tools/mutate.py --only alpha     # mutants whose name contains "alpha"
    python tools/mutate.py --only alpha,norm  # ... "alpha" or "norm"
    python tools/mutate.py --list

It needs the build dependencies of the package in the running environment (torch, ninja)
and takes a few minutes per mutant on 2 cores; it does not run in CI.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    before: str
    after: str
    what: str


MUTANTS = [
    # The mask rule (csrc/philox.h).
    Mutant(
        "keep-threshold-off-by-one",
        "csrc/philox.h",
        "return KeepRule{t == 0 ? 0u : static_cast<uint32_t>(t - 1), t != 0 ? 1u : 0u};",
        "return KeepRule{static_cast<uint32_t>(t), t != 0 ? 1u : 0u};",
        "the keep test takes r <= t instead of r < t",
    ),
    Mutant(
        "philox-round-constant",
        "csrc/philox.h",
        "0xD2511F53",
        "0xD2511F55",
        "a wrong Philox multiplier",
    ),
    Mutant(
        "counter-high-word",
        "csrc/philox.h",
        "static_cast<uint32_t>(counter >> 32)",
        "static_cast<uint32_t>(counter >> 31)",
        "the counter's high word taken from the wrong bits",
    ),
    # The forms (csrc/rules.h).
    Mutant(
        "alpha-dropped-constant",
        "csrc/rules.h",
        "static_cast<scalar_t>(a * kAlpha * (p_drop - 1.0))",
        "static_cast<scalar_t>(a * kAlpha * p_drop - a * kAlpha)",
        "alpha dropout's dropped value written a*alpha*p - a*alpha (1 ulp off in float64)",
    ),
    Mutant(
        "relu-nan",
        "csrc/rules.h",
        "return x < acc_t(0) ? acc_t(0) : x;",
        "return x > acc_t(0) ? x : acc_t(0);",
        "ReLU turns NaN (and -0.0) into +0.0",
    ),
    Mutant(
        "silu-backward-term",
        "csrc/rules.h",
        "dy * sigmoid * (acc_t(1) + x * (acc_t(1) - sigmoid))",
        "dy * sigmoid * (acc_t(1) + x)",
        "SiLU's derivative without its (1 - sigmoid) factor",
    ),
    Mutant(
        "gelu-tanh-kappa",
        "csrc/rules.h",
        "constexpr acc_t kKappa = acc_t(0.044715);\n    const acc_t inner",
        "constexpr acc_t kKappa = acc_t(0.04475);\n    const acc_t inner",
        "tanh GELU's cubic coefficient mistyped in the forward",
    ),
    Mutant(
        "act-grad-skips-dropped-reads",
        "csrc/rules.h",
        "  static constexpr bool kDroppedReadsInput = true;",
        "  static constexpr bool kDroppedReadsInput = false;",
        "act_dropout's backward claims a dropped element ignores its input (0 * inf is NaN)",
    ),
    # The walk.
    Mutant(
        "shared-innermost-stride",
        "csrc/checks.cpp",
        "layout.strides[d] = is_shared[d] ? 0 : layout.numel;",
        "layout.strides[d] = is_shared[d] && d + 1 < ndim ? 0 : (is_shared[d] ? 1 : layout.numel);",
        "a shared innermost dim given stride 1 (stripes instead of one value)",
    ),
    Mutant(
        "cpu-skip-ignores-rule",
        "csrc/cpu/walk.h",
        "if (!Rule::kDroppedReadsInput && mask_step == 0 && !rule.keeps(run_words[0])) {",
        "if (mask_step == 0 && !rule.keeps(run_words[0])) {",
        "the CPU's dropped-run skip ignores kDroppedReadsInput",
    ),
    # (A bias column computed from the chunk alone, start % last_size, is not listed: where a
    # bias runs the walk is logical, so row * inner is a multiple of the last dim and the
    # change cannot alter a result.)
    Mutant(
        "gather-ignores-stride",
        "csrc/cpu/walk.h",
        "for (int64_t i = 0; i < count; ++i) x_run[i] = x[i * x_step];",
        "for (int64_t i = 0; i < count; ++i) x_run[i] = x[i];",
        "the CPU's strided gather reads consecutive elements",
    ),
    # Autograd and vmap.
    Mutant(
        "act-vmap-different",
        "fused_dropout/ops.py",
        "    per_sample = _mask_per_sample(info, seed)\n    input_bdim, bias_bdim = in_dims[0], in_dims[1]",
        "    per_sample = False and _mask_per_sample(info, seed)\n    input_bdim, bias_bdim = in_dims[0], in_dims[1]",
        "act_dropout's vmap rule ignores randomness='different'",
    ),
    Mutant(
        "alpha-backward-scale",
        "csrc/ops/alpha_dropout/alpha_dropout.cpp",
        "record_replay(output, rng_state, p, shared_dims, a, false, input.scalar_type(), input);",
        "record_replay(output, rng_state, p, shared_dims, std::nullopt, false, input.scalar_type(), input);",
        "alpha dropout's gradient scaled by 1/(1-p) instead of its a",
    ),
    Mutant(
        "residual-grad-dtype",
        "csrc/autograd.cpp",
        "at::Tensor grad_input = replay(grad_output, rng_state.unpack(), p, shared_dims, scale, mask_dtype);",
        "at::Tensor grad_input = replay(grad_output, rng_state.unpack(), p, shared_dims, scale);",
        "a mixed-dtype dropout_add's gradient masked before its rounding to the input's dtype",
    ),
    Mutant(
        "replay-rounds-after-the-mask",
        "csrc/cpu/simd_avx512.cpp",
        "dropout_lanes(round_to<Format>(_mm512_loadu_ps(x16)), w16, rule)",
        "dropout_lanes(_mm512_loadu_ps(x16), w16, rule)",
        "a float32 gradient replayed into a 2-byte dtype is masked and scaled before its conversion",
    ),
    Mutant(
        "float-residual-sum-narrowed",
        "csrc/cpu/simd_avx512.cpp",
        "store_float_lanes<Format>(y16, _mm512_add_ps(load_float_lanes<Format>(res16), dropped));",
        "store_float_lanes<Format>(y16, round_to<Format>(_mm512_add_ps(load_float_lanes<Format>(res16), dropped)));",
        "the float32 residual stream's sum is rounded to the 2-byte input's dtype",
    ),
    # The row-reduction form.
    Mutant(
        "norm-mask-step",
        "csrc/ops/dropout_add_norm/dropout_add_norm_cpu.cpp",
        "const int64_t base = mask.base(row), step = mask.step;",
        "const int64_t base = mask.base(row), step = 1;",
        "dropout_add_norm's rows ignore a mask shared along the last dim",
    ),
    Mutant(
        "norm-backward-no-centering",
        "csrc/ops/dropout_add_norm/dropout_add_norm_autograd.cpp",
        "const at::Tensor centered = rms ? dh : dh - dh.mean(-1, /*keepdim=*/true);",
        "const at::Tensor centered = dh;",
        "LayerNorm's backward forgets the mean's derivative",
    ),
    Mutant(
        "linear-weight-grad-undropped",
        "csrc/ops/dropout_linear/dropout_linear_autograd.cpp",
        "const at::Tensor dropped = replay(input.unpack(), state, p, shared_dims);",
        "const at::Tensor dropped = input.unpack();",
        "dropout_linear's weight gradient uses the input, not the redrawn dropped input",
    ),
    # Shards of a DTensor (csrc/checks.cpp, fused_dropout/distributed.py).
    Mutant(
        "shard-origin-dropped",
        "csrc/checks.cpp",
        "if (current_window) layout.origin += current_window->origin[d] * layout.strides[d];",
        "if (false) layout.origin += current_window->origin[d] * layout.strides[d];",
        "every shard's mask index starts at 0 instead of its origin in the whole tensor",
    ),
    Mutant(
        "shard-takes-row-major-path",
        "csrc/checks.cpp",
        "layout.row_major = layout.row_major && layout.origin == 0;",
        "layout.row_major = layout.row_major;",
        "a shard along dim 0 takes the row-major walk, which ignores its origin",
    ),
    Mutant(
        "norm-keeps-sharded-rows",
        "fused_dropout/distributed.py",
        "keep = type(placement) is Shard and not (whole_last_dim and placement.dim % ndim == ndim - 1)",
        "keep = type(placement) is Shard",
        "the norm forms normalise each shard of a sharded last dim on its own",
    ),
    # The Python layer.
    Mutant(
        "lora-variant-fused",
        "fused_dropout/modules.py",
        '            if adapter in getattr(layer, "lora_variant", {}):',
        "            if False:",
        "replace_dropout fuses a DoRA adapter's dropout into lora_A",
    ),
    Mutant(
        "batch-mode-dims",
        "fused_dropout/functional.py",
        '    if mode == "batch":\n        return tuple(range(ndim))',
        '    if mode == "batch":\n        return tuple(range(ndim - 1))',
        "stochastic depth's batch mode shares over the wrong dims",
    ),
    Mutant(
        "seed-offset-dropped",
        "fused_dropout/ops.py",
        "    return _as_int64_bits(seed), _as_int64_bits(offset)",
        "    return _as_int64_bits(seed), 0",
        "an explicit offset is ignored",
    ),
    # replace_dropout.
    Mutant(
        "fuse-any-dropout",
        "fused_dropout/modules.py",
        "type(dropout) is not nn.Dropout or _has_hooks",
        "not isinstance(dropout, nn.modules.dropout._DropoutNd) or _has_hooks",
        "ReLU fused with any _DropoutNd (Dropout2d stops being channel-wise)",
    ),
    Mutant(
        "fuse-custom-forward",
        "fused_dropout/modules.py",
        "return isinstance(container, nn.Sequential) and type(container).forward is nn.Sequential.forward",
        "return isinstance(container, nn.Sequential)",
        "pairs fused inside Sequential subclasses with their own forward",
    ),
    Mutant(
        "hooks-dropped",
        "fused_dropout/modules.py",
        "        _take_over_hooks(fused, module)\n",
        "",
        "hooks on a replaced module are lost",
    ),
    # The functional mode (fused_dropout/functional_routing.py).
    Mutant(
        "functional-learns-from-any-module",
        "fused_dropout/functional_routing.py",
        "and not self.learned and _routing_of(module) is self",
        "and not self.learned",
        "a submodule called on its own ends the learning forward: the model's other callers lose the mode",
    ),
    Mutant(
        "functional-mode-in-eval",
        "fused_dropout/functional_routing.py",
        "if module.training and all(entry.mode is None for entry in _ENTRIES.stack):",
        "if all(entry.mode is None for entry in _ENTRIES.stack):",
        "the mode is entered in eval too, where it only costs host time",
    ),
    Mutant(
        "functional-checkpointed-call-allowed",
        "fused_dropout/functional_routing.py",
        "            _refuse_a_call_checkpointed_inside(entry.module, entry.call, func)\n",
        "",
        "F.dropout in a function checkpointed inside a module is fused, and recomputed by torch's kernel",
    ),
]

# The files a scratch copy needs: the package, its sources, the tests and this tool (whose
# mutants a test checks).
COPIED = ["csrc", "fused_dropout", "tests", "benchmarks", "tools", "setup.py", "pyproject.toml", "README.md", "LICENSE"]


def run(command, cwd, log, timeout, env=None):
    with open(log, "w") as out:
        return subprocess.run(
            command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env
        ).returncode


def prepare_scratch(scratch: Path):
    # Files are copied with fresh times (shutil.copy, not copy2), so that ninja rebuilds what
    # changed since the last run, an interrupted mutant included. A copied folder is replaced
    # whole, so a file deleted from the tree is not built from an older copy.
    if not scratch.exists():
        scratch.mkdir(parents=True)
    for name in COPIED:
        source, target = ROOT / name, scratch / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            ignore = shutil.ignore_patterns("__pycache__", "*.so")
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=ignore, copy_function=shutil.copy)
        else:
            shutil.copy(source, target)


def build(scratch: Path, log: Path) -> bool:
    env_command = [sys.executable, "setup.py", "build_ext", "--inplace"]
    os.environ["FUSED_DROPOUT_CPU_ONLY"] = "1"
    return run(env_command, scratch, log, timeout=1800) == 0


def test(scratch: Path, log: Path, timeout: int) -> bool:
    # -x: one failing test is enough to catch a mutant. The files that check against
    # independent references run first, on their own, so a caught mutant is usually caught in
    # seconds; only a mutant they miss runs the whole suite.
    first = ["tests/test_rules.py", "tests/test_torch_features.py", "tests/test_mask.py", "tests/test_family.py"]
    env = dict(os.environ, PYTHONPATH=str(scratch))  # subprocesses of the tests import the scratch copy too
    pytest = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    if run(pytest + first, scratch, log, timeout=timeout, env=env) != 0:
        return False
    return run(pytest + ["tests"], scratch, log, timeout=timeout, env=env) == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default=None, help="run the mutants whose name contains this (or any of these, comma-separated)"
    )
    parser.add_argument("--start-at", default=None, help="skip the mutants listed before this one")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--scratch", default="/tmp/fused_dropout_mutants", help="scratch copy of the repository")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds for one test run")
    args = parser.parse_args()
    wanted = None if args.only is None else args.only.split(",")
    mutants = [m for m in MUTANTS if wanted is None or any(w in m.name for w in wanted)]
    if args.start_at is not None:
        names = [m.name for m in mutants]
        mutants = mutants[names.index(args.start_at) :]
    if args.list:
        for m in mutants:
            print(f"{m.name:30} {m.path:28} {m.what}")
        return 0

    scratch = Path(args.scratch)
    logs = scratch / "logs"
    prepare_scratch(scratch)
    logs.mkdir(exist_ok=True)
    print(f"scratch copy: {scratch}; building it unmutated", flush=True)
    if not build(scratch, logs / "build-unmutated.log"):
        print(f"the unmutated build failed: {logs / 'build-unmutated.log'}")
        return 2
    if not test(scratch, logs / "test-unmutated.log", args.timeout):
        print(f"the unmutated suite fails, so no mutant can be judged: {logs / 'test-unmutated.log'}")
        return 2

    results = []
    for m in mutants:
        path = scratch / m.path
        original = path.read_text()
        if original.count(m.before) != 1:
            print(f"{m.name}: its text is not found once in {m.path}; update the mutant", flush=True)
            results.append((m, "stale"))
            continue
        start = time.time()
        path.write_text(original.replace(m.before, m.after))
        try:
            if not build(scratch, logs / f"build-{m.name}.log"):
                verdict = "caught (does not build)"
            elif test(scratch, logs / f"test-{m.name}.log", args.timeout):
                verdict = "SURVIVED"
            else:
                verdict = "caught"
        finally:
            path.write_text(original)
        results.append((m, verdict))
        print(f"{m.name:30} {verdict:24} {time.time() - start:6.0f} s  {m.what}", flush=True)
    build(scratch, logs / "build-restored.log")

    caught = sum(v.startswith("caught") for _, v in results)
    print(f"\n{caught} of {len(results)} mutants caught")
    for m, verdict in results:
        if not verdict.startswith("caught"):
            print(f"  {verdict}: {m.name} ({m.path}): {m.what}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
