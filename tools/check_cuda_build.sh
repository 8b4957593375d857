#!/usr/bin/env bash
# Build the extension as a CUDAExtension (FORCE_CUDA=1) against a CUDA build of torch on a machine
# with nvcc but no GPU, then run the tests that exercise the CUDA build's host code and error
# paths on CPU tensors: the CUDA build links differently (nvcc, libcudart, the CUDA kernels'
# registrations), and a defect there (an extension that crashes on its own TORCH_CHECK messages)
# shows up on CPU tensors too. It proves nothing about the kernels' device code: that needs a GPU.
#
#   bash tools/check_cuda_build.sh
#
# Variables:
#   CHIMERA_CUDA_VENV   the virtual environment with the CUDA torch (default ~/.cache/chimera-cuda-venv);
#                       created when missing, reused when it already has torch with CUDA, torch_geometric
#                       and pytest. A clean venv: --system-site-packages would mix two torch builds.
#   CHIMERA_CUDA_TORCH  the torch version to install there (default 2.14.1; pip takes its CUDA wheel).
#   CHIMERA_CUDA_BUILD_DIR  where the source is copied and built (default: a fresh temporary directory),
#                       so that the CPU build in the checkout is left alone.
#   TORCH_CUDA_ARCH_LIST  the GPU architectures to compile (default 9.0: one, to keep the build short).
#   CUDA_HOME           the CUDA toolkit (default /usr/local/cuda when it exists).
#   CC, CXX, LDSHARED, LDCXXSHARED  as for setup.py (see its docstring).
# Extra arguments go to pytest (default: the error-path and kernel tests listed below).
#
# Timing (2-core machine shared with other jobs, 2026-11-25): 1.5 min to create the venv from the
# local wheel (13 s to reuse it), 7.7 min for the CUDA build, 1.3 min for the tests (82 of them);
# 9 min in all with the venv reused. Too long for every CI run, so
# .ci/run does not call it: run it by hand after changing csrc/ or the build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${CHIMERA_CUDA_VENV:-$HOME/.cache/chimera-cuda-venv}
torch_version=${CHIMERA_CUDA_TORCH:-2.14.1}
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
command -v nvcc >/dev/null || { echo "check_cuda_build: nvcc not found" >&2; exit 2; }

start=$(date +%s)
if ! "$venv/bin/python" -c "import torch, torch_geometric, pytest; assert torch.version.cuda" 2>/dev/null; then
  echo "== creating $venv with torch==$torch_version (CUDA wheel)"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$torch_version" torch_geometric \
    pytest setuptools
fi
"$venv/bin/python" -c "import torch; print('== torch', torch.__version__, 'CUDA', torch.version.cuda)"
venv_done=$(date +%s)

build=${CHIMERA_CUDA_BUILD_DIR:-$(mktemp -d)}
mkdir -p "$build"
# The tracked and new files of the checkout (not its build outputs).
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$build"
rm -f "$build"/torch_geometric_chimera/_C*.so
cd "$build"
echo "== FORCE_CUDA=1 build in $build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
FORCE_CUDA=1 "$venv/bin/python" setup.py build_ext --inplace > build.log 2>&1 || { tail -40 build.log; exit 1; }
build_done=$(date +%s)
# It must be the CUDA build: the CUDA kernels are registered.
"$venv/bin/python" - <<'EOF'
import torch
import torch_geometric_chimera  # noqa: F401
for op in ("spmm", "edge_dot", "dag_solve"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"chimera::{op}", "CUDA"), f"chimera::{op}: no CUDA kernel"
print("== CUDA kernels registered:", torch_geometric_chimera.ops._extension._C.__file__)
EOF
"$venv/bin/python" tools/extension_abi.py torch_geometric_chimera/_C*.so
if [ $# -eq 0 ]; then
  set -- tests/test_build.py tests/ops/test_raw_op_safety.py tests/ops/test_kernels.py tests/ops/test_dag_kernel.py \
    tests/ops/test_band_kernel.py
fi
status=0
PYTHONPATH="$build" "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=$?
end=$(date +%s)
echo "== times: venv $((venv_done - start)) s, CUDA build $((build_done - venv_done)) s, tests $((end - build_done)) s"
[ -z "${CHIMERA_CUDA_BUILD_DIR:-}" ] && rm -rf "$build"
cd "$root"
exit $status
