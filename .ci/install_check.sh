#!/usr/bin/env bash
# The installs users reach for, from a fresh venv with a CPU-only torch: the sdist, built into
# a wheel as `pip install <sdist>` builds it (--no-build-isolation), installed, imported and
# smoke-tested from outside the source tree; then the test suite from the sdist against the
# installed wheel (the CPU-only path: tests needing torchvision or scipy skip with a reason).
# One build: `pip install <sdist>` is this same wheel build followed by its install.
#     bash .ci/install_check.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
# This is the CPU-only path: a CUDA build forced by the caller's environment cannot happen here.
unset FORCE_CUDA
SRC=$(pwd)
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
PY=${PYTHON:-python3}

$PY -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0" numpy pytest expecttest "setuptools>=77" wheel ninja build

echo "== sdist"
python -m build --sdist --outdir "$WORK/dist" "$SRC" >"$WORK/sdist.log" 2>&1 || { tail -30 "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/fused_dropout-*.tar.gz)
tar -tzf "$SDIST" | grep -E "csrc/(cpu/simd.h|cuda/kernels.cuh|rules.h)|tests/(conftest|helpers|reference).py|requirements.txt" \
  | sort | tee "$WORK/sdist_contents.txt"
[ "$(wc -l <"$WORK/sdist_contents.txt")" -eq 7 ] || { echo "the sdist lacks sources"; exit 1; }

smoke() {
  (cd "$WORK" && python - <<'PY'
import torch, fused_dropout
x = torch.randn(1000)
y = fused_dropout.dropout(x, 0.5, seed=1)
assert torch.equal(y, fused_dropout.dropout(x, 0.5, seed=1)) and (y == 0).any()
print("smoke test passed:", fused_dropout.__file__)
PY
  python -m fused_dropout --info)
}

echo "== the sdist built into a wheel and installed"
python -m pip wheel --quiet --no-build-isolation --no-deps -w "$WORK/wheels" "$SDIST"
python -m pip install --quiet --no-deps "$WORK"/wheels/fused_dropout-*.whl
smoke
mkdir -p "$WORK/sdist_tree" && tar -xzf "$SDIST" -C "$WORK/sdist_tree"
TREE=$(ls -d "$WORK"/sdist_tree/fused_dropout-*)

echo "== the tests, from the sdist, against the installed wheel (CPU-only torch, no torchvision or scipy)"
(cd "$WORK" && python -m pytest -q -p no:cacheprovider "$TREE/tests")
