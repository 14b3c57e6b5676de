#!/usr/bin/env bash
# One device call for xlstm's GPU paths (H100; cupy-cuda13x 14.2, torch 2.11+cu130, jax 0.11).
# Needs PYTHONPATH = carried wheels (array-api-compat, array-api-strict) + repo, and $OUT.
# See README.md beside it for the one command that runs it.
# Writes $OUT/tests.log, $OUT/sanitizer.log, $OUT/bench_{off,on}/bench_*.{json,md}; the caller
# tees stdout to $OUT/run.log. Steps run in order of value; each has a cap, and none runs past
# BUDGET seconds (default 420) from the start: the whole suite, last, gets what is left.
set -u
cd "$(dirname "$0")/../.."
END=$((SECONDS + ${BUDGET:-420}))
cap() { local l=$((END - SECONDS - 5)); l=$((l < $1 ? l : $1)); echo $((l > 5 ? l : 5)); }
step() { echo; echo "=== [t=${SECONDS}s, $((END - SECONDS))s left] $*"; }
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_PREALLOCATE=false CUPY_TF32=0
PYT="python3 -m pytest -q -p no:cacheprovider -p no:benchmark -rfE --timeout 150 --timeout-method thread"
CS="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
B="python3 benchmarks/bench_lstm.py --backend cupy --repeat 5 --warmup 2 --in-process --no-plot"

step "versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_mode --format=csv
nvcc --version | tail -1; "$CS" --version | head -1
python3 -c "
import sys, numpy, cupy, torch, array_api_compat as c, array_api_strict as s
rt = cupy.cuda.runtime; a = cupy.cuda.Device(0).attributes
print(sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'torch', torch.__version__,
      'cudnn', torch.backends.cudnn.version(), 'compat', c.__version__, 'strict', s.__version__)
print('nvrtc', cupy.cuda.nvrtc.getVersion(), 'runtime', rt.runtimeGetVersion(), 'driver', rt.driverGetVersion(),
      {k: a[k] for k in ('MultiProcessorCount', 'MaxSharedMemoryPerBlockOptin', 'CooperativeLaunch')})"
env -u JAX_PLATFORMS timeout 90 python3 -m xlstm check --backends numpy,cupy,torch-cuda,jax-gpu | tail -8

step "GPU-marked tests: fused kernels (persistent, per-step) vs the CuPy array path; NCCL"
XLSTM_BACKENDS=cupy timeout "$(cap 120)" $PYT -n 8 -m gpu --durations 8 tests > "$OUT/tests.log" 2>&1
echo "gpu tests rc=$?"; tail -12 "$OUT/tests.log"

step "smoke: cupy / torch-cuda / jax-gpu vs numpy float64, MLSTM chunkwise; per-step slopes"
env -u JAX_PLATFORMS timeout "$(cap 80)" python3 benchmarks/gpu/smoke.py --slopes; echo "smoke rc=$?"

step "bench vs cuDNN, TF32 off on both sides"
timeout "$(cap 120)" $B --tf32 off --preset gpu --impls xlstm xlstm-per-step xlstm-persistent \
    xlstm-plain torch gemm xlstm-gru torch-gru xlstm-slstm --out "$OUT/bench_off" | tail -40

step "compute-sanitizer memcheck: every cell, float32 and float64, persistent (real, small device), per-step"
export PYTHONPATH="$PYTHONPATH:$PWD/tests"
timeout "$(cap 90)" "$CS" --tool memcheck --error-exitcode 9 --print-limit 20 \
    python3 benchmarks/gpu/sancheck.py all --dtypes=float32,float64 > "$OUT/sanitizer.log" 2>&1; echo "memcheck rc=$?"
grep -E "ERROR SUMMARY|sancheck:|Invalid|out of bounds" "$OUT/sanitizer.log" | tail -6

step "bench vs cuDNN, TF32 on on both sides (torch's cuDNN default; CUPY_TF32=1)"
timeout "$(cap 60)" $B --tf32 on --sizes 256,256,64,100 1024,1024,64,100 768,768,16,1024 \
    --impls xlstm xlstm-per-step torch --out "$OUT/bench_on" | tail -16

step "compute-sanitizer racecheck: every cell, float32"
timeout "$(cap 60)" "$CS" --tool racecheck --error-exitcode 9 --print-limit 20 \
    python3 benchmarks/gpu/sancheck.py all >> "$OUT/sanitizer.log" 2>&1
echo "racecheck rc=$?"; grep -E "RACECHECK SUMMARY|sancheck:" "$OUT/sanitizer.log" | tail -3

step "whole suite on cupy, torch-cuda and jax-gpu: backend-parametrized tests first, then the rest"
for sel in "cupy or cuda or gpu" "not (cupy or cuda or gpu)"; do
  echo "----- pytest -k '$sel'" >> "$OUT/tests.log"
  XLSTM_BACKENDS=cupy,torch-cuda,jax-gpu env -u JAX_PLATFORMS timeout "$(cap 600)" \
      $PYT -n 12 --maxfail 25 --durations 10 -k "$sel" tests >> "$OUT/tests.log" 2>&1
  echo "suite -k '$sel' rc=$? (124: cut by the budget)"
done
tail -25 "$OUT/tests.log"; step "done"
