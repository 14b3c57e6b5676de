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
trap 'rm -rf "$tmp"' EXIT

python="python"
command -v "$python" >/dev/null 2>&1 || python="python3"
"$python" "$root/xlstm/accel/cuda/kernels.py" --write "$tmp/gen" >"$tmp/files"
mapfile -t files <"$tmp/files"
echo "compile_cuda: generated ${files[*]##*/} from the kernel table"

cxx=""
for c in "${CXX:-}" c++ g++ clang++; do
    if [[ -n "$c" ]] && command -v "$c" >/dev/null 2>&1; then cxx="$c"; break; fi
done
if [[ -n "$cxx" ]]; then
    for f in "${files[@]}"; do
        [[ "$f" == *_host.cpp ]] || continue
        "$cxx" -std=c++17 -ffp-contract=off -Wall -Wextra -Wpedantic -Werror \
            -I"$root/tests/cuda_host" -c -o "$tmp/host.o" "$f"
        echo "compile_cuda: host build of ${f##*/} OK ($cxx)"
    done
fi

if ! command -v nvcc >/dev/null 2>&1; then
    echo "compile_cuda: nvcc not found, skipping the CUDA kernel compile check"
    exit 0
fi

for f in "${files[@]}"; do
    [[ "$f" == *.cu ]] || continue
    nvcc -arch="$arch" --fmad=false -Werror all-warnings -Xcompiler -Wall,-Wextra \
        -c -o "$tmp/kernels.o" "$f"
    nvcc -arch="$arch" --fmad=false -ptx -o "${f%.cu}.ptx" "$f"
    echo "compile_cuda: nvcc -arch=$arch compiled ${f##*/} OK ($(nvcc --version | tail -n 1))"
done
# No persistent kernel may read memory that its launch writes through ld.global.nc.
"$python" "$root/xlstm/accel/cuda/kernels.py" --check-ptx "$tmp/gen"
