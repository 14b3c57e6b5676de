#!/usr/bin/env bash
# Compile the fused CUDA kernels (xlstm/accel/cuda) without a GPU, warnings as errors: the
# sources generated from the kernel table (python xlstm/accel/cuda/kernels.py --write DIR, with the
# python on PATH) with nvcc, and their host builds behind the grid emulator of the tests
# (tests/cuda_host/grid_emulator.h) with the host C++ compiler; then their PTX checked: no
# persistent kernel reads memory that its launch writes through the non-coherent path.
#
#   bash .ci/compile_cuda.sh            # sm_90 (H100)
#   CUDA_ARCH=sm_80 bash .ci/compile_cuda.sh
#
# Exits 0 with a message when nvcc is not installed, non-zero on any compile error.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
arch="${CUDA_ARCH:-sm_90}"

tmp="$(mktemp -d)"
trap 'wait; rm -rf "$tmp"' EXIT

python="python"
command -v "$python" >/dev/null 2>&1 || python="python3"
"$python" "$root/xlstm/accel/cuda/kernels.py" --write "$tmp/gen" >"$tmp/files"
mapfile -t files <"$tmp/files"
echo "compile_cuda: generated ${files[*]##*/} from the kernel table"

# Every build runs in the background; each failure is reported and fails the script.
pids=()
finish() {
    local failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    pids=()
    return "$failed"
}

cxx=""
for c in "${CXX:-}" c++ g++ clang++; do
    if [[ -n "$c" ]] && command -v "$c" >/dev/null 2>&1; then cxx="$c"; break; fi
done
if [[ -n "$cxx" ]]; then
    for f in "${files[@]}"; do
        [[ "$f" == *_host.cpp ]] || continue
        ("$cxx" -std=c++17 -ffp-contract=off -Wall -Wextra -Wpedantic -Werror \
            -I"$root/tests/cuda_host" -c -o "${f%.cpp}.o" "$f"
         echo "compile_cuda: host build of ${f##*/} OK ($cxx)") &
        pids+=("$!")
    done
fi

if ! command -v nvcc >/dev/null 2>&1; then
    finish
    echo "compile_cuda: nvcc not found, skipping the CUDA kernel compile check"
    exit 0
fi

# One nvcc run per source gives both the object and (kept) the PTX that nvcc -ptx writes.
version="$(nvcc --version | tail -n 1)"
for f in "${files[@]}"; do
    [[ "$f" == *.cu ]] || continue
    keep="${f%.cu}.keep"
    mkdir -p "$keep"
    (nvcc -arch="$arch" --fmad=false -Werror all-warnings -Xcompiler -Wall,-Wextra \
        -c -o "${f%.cu}.o" --keep --keep-dir "$keep" "$f"
     cp "$keep/$(basename "${f%.cu}").ptx" "${f%.cu}.ptx"
     echo "compile_cuda: nvcc -arch=$arch compiled ${f##*/} OK ($version)") &
    pids+=("$!")
done
finish
# No persistent kernel may read memory that its launch writes through ld.global.nc.
"$python" "$root/xlstm/accel/cuda/kernels.py" --check-ptx "$tmp/gen"
