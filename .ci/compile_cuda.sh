#!/usr/bin/env bash
# Compile the fused LSTM kernels (xlstm/_cuda) with nvcc, warnings as errors, and the
# shared pointwise header with the host C++ compiler. Needs no GPU.
#
#   bash .ci/compile_cuda.sh            # sm_90 (H100)
#   CUDA_ARCH=sm_80 bash .ci/compile_cuda.sh
#
# Exits 0 with a message when nvcc is not installed, non-zero on any compile error.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$(cd "$here/../xlstm/_cuda" && pwd)"
arch="${CUDA_ARCH:-sm_90}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

cxx=""
for c in c++ g++ clang++; do
    if command -v "$c" >/dev/null 2>&1; then cxx="$c"; break; fi
done
if [[ -n "$cxx" ]]; then
    cat >"$tmp/host.cpp" <<'CPP'
#include "lstm_pointwise.cuh"
template <typename T> void use() {
    T v[8] = {};
    xlstm::lstm_fwd_elem<T>(0, 1, v, v, v, v, v, v, v, v);
    xlstm::lstm_bwd_elem<T>(0, 1, v, v, v, v, v, v, v, v, v);
}
template void use<float>();
template void use<double>();
CPP
    "$cxx" -std=c++17 -Wall -Wextra -Wpedantic -Werror -I"$src" -c -o "$tmp/host.o" "$tmp/host.cpp"
    echo "compile_cuda: host build of lstm_pointwise.cuh OK ($cxx)"
fi

if ! command -v nvcc >/dev/null 2>&1; then
    echo "compile_cuda: nvcc not found, skipping the CUDA kernel compile check"
    exit 0
fi

nvcc -arch="$arch" --fmad=false -Werror all-warnings -Xcompiler -Wall,-Wextra \
    -I"$src" -c -o "$tmp/lstm_kernels.o" "$src/lstm_kernels.cu"
echo "compile_cuda: nvcc -arch=$arch compiled xlstm/_cuda/lstm_kernels.cu OK ($(nvcc --version | tail -n 1))"
