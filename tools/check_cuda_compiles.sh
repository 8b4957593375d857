#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc against the installed torch headers, without linking.
# For machines with nvcc but a CPU-only torch: the CPU wheel lacks one generated c10/cuda header,
# which this script stubs in a temporary include directory. It proves the CUDA sources compile;
# it proves nothing about running them.
set -euo pipefail
cd "$(dirname "$0")/.."
stub=$(mktemp -d)
mkdir -p "$stub/c10/cuda/impl"
echo '#pragma once' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
includes=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
pyinc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
abi=$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
for source in csrc/cuda/*.cu; do
  echo "nvcc: $source"
  nvcc -std=c++20 -O2 --expt-relaxed-constexpr -arch="${CUDA_ARCH:-sm_90}" -c "$source" -o "$stub/$(basename "$source").o" \
    -I"$stub" $includes -I"$pyinc" -D_GLIBCXX_USE_CXX11_ABI="$abi"
done
echo "all CUDA sources compiled"
