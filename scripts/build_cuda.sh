#!/usr/bin/env bash
# Builds tern with `--features cuda` on a machine WITHOUT a GPU or a CUDA install (issue 14):
#   1. installs CUDA 13.0's compiler, headers and link-time libraries from PyPI into
#      build/cuda/py (pinned to 13.0.x: the GPU machines run driver 580 / CUDA 13.0, which will
#      not load code from a newer compiler);
#   2. makes a stub libcuda.so (SONAME libcuda.so.1) exporting the driver functions cudarc
#      declares: the driver has no wheel, and the real one is on the GPU machine at run time;
#   3. cargo build --release --features cuda into target/cuda (the CPU build is untouched).
# Extra arguments go to cargo (e.g. --tests to build the test executables too). The last line
# printed is the binary's path. Running it on the GPU machine needs LD_LIBRARY_PATH to reach
# CUDA 13's cuBLAS / cuRAND / NVRTC there (scripts/gpu_check.sh sets it from PyTorch's wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=build/cuda/py
CU=$PY/nvidia/cu13
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88"
if [ ! -x "$CU/bin/nvcc" ] || [ ! -e "$CU/lib/libcublas.so.13" ]; then
  echo "== installing CUDA 13.0 wheels into $PY" >&2
  # shellcheck disable=SC2086
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$PY" $WHEELS
fi
CU=$(cd "$CU" && pwd)

# The linker asks for libX.so; the wheels ship libX.so.N only.
for l in cublas cublasLt curand nvrtc cudart; do
  real=$(ls "$CU/lib/lib$l.so."* 2>/dev/null | grep -E "lib$l\.so\.[0-9]+$" | head -1)
  [ -n "$real" ] || { echo "build_cuda: lib$l.so.N missing under $CU/lib" >&2; exit 1; }
  ln -sf "$(basename "$real")" "$CU/lib/lib$l.so"
done

# libcuda stub: one symbol per driver function in cudarc's bindings (never called: the real
# libcuda.so.1 of the GPU machine is loaded in its place at run time).
cargo fetch --quiet
CUDARC=$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
mkdir -p "$CU/lib/stubs"
grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$CUDARC/src/driver/sys/mod.rs" | sed 's/^pub unsafe fn //' | sort -u |
  awk '{ print "int " $1 "(void) { return 999; /* CUDA_ERROR_UNKNOWN */ }" }' > "$CU/lib/stubs/libcuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so" "$CU/lib/stubs/libcuda_stub.c"

export PATH="$CU/bin:$PATH" CUDA_ROOT="$CU" CUDA_HOME="$CU" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
echo "== cargo build --release --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; ~9 min cold on 2 cores)" >&2
# No debug info in this build (the release profile keeps it for profiling on the CPU): it halves
# target/cuda, and CI's disk is finite.
CARGO_PROFILE_RELEASE_DEBUG=false cargo build --release --features cuda --target-dir target/cuda "$@" >&2
echo "$(pwd)/target/cuda/release/tern"
