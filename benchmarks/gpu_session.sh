#!/usr/bin/env bash
# One GPU session on a fresh box: the GPU tests, then the GPU benchmark, results copied to $OUT.
#
# Needs torch with CUDA and onnxruntime-gpu importable (on PYTHONPATH or installed); TensorRT and
# pycuda are optional (their tests skip with the reason). Run from the repository root:
#   OUT=/some/dir PYTHON=python3 benchmarks/gpu_session.sh
# Each step's exit code is recorded in $OUT/status.txt; a failing step does not stop the next.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$ROOT/benchmarks/results/gpu-session}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

step() {  # name, command...
  local name="$1"; shift
  local started=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local code=$?
  echo "$name exit=$code seconds=$((SECONDS - started))" | tee -a "$OUT/status.txt"
}

: >"$OUT/status.txt"
step environment "$PYTHON" -c "
import torch, onnxruntime as ort
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print('onnxruntime', ort.__version__, ort.get_available_providers())"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
step test_cuda "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_staging_kinds.py \
  tests/test_engines_tensorrt.py
step test_fp16_exchange "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_exchange_fp16_engines.py -k gpu
step bench_gpu bash -c "cd benchmarks && timeout 420 '$PYTHON' bench_gpu.py --results '$OUT'"
cat "$OUT/status.txt"
