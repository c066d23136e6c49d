#!/usr/bin/env bash
# Builds stock llama.cpp's llama-bench, llama-quantize, llama-perplexity, llama-completion and
# llama-tokenize from the copy vendored in the llama-cpp-python sdist on PyPI (the only route to
# llama.cpp's source here), with cmake and ninja from PyPI in a venv. Idempotent; the last line printed is the
# directory holding the binaries.
#   scripts/build_llama_cpp.sh [WORKDIR]   (default: build/llama.cpp, ignored by git)
#   env LLAMA_ISA=avx2: build for AVX2 + FMA only (no AVX-512, no AMX), in its own build
#   directory, to run beside `TERN_ISA=avx2` as an AVX2-only CPU would (the default, native,
#   uses every extension this CPU has).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-build/llama.cpp}
mkdir -p "$work"
work=$(cd "$work" && pwd)
case ${LLAMA_ISA:-native} in
  native) build=build; isa_flags=() ;;
  avx2) build=build-avx2
    isa_flags=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
      -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF) ;;
  *) echo "error: LLAMA_ISA=$LLAMA_ISA: expected native or avx2" >&2; exit 1 ;;
esac
bin="$work/src/vendor/llama.cpp/$build/bin"
if [[ -x $bin/llama-bench && -x $bin/llama-quantize && -x $bin/llama-perplexity && -x $bin/llama-tokenize ]]; then
  echo "$bin"; exit 0
fi
if [[ ! -x $work/venv/bin/cmake ]]; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install --quiet cmake ninja >&2
fi
if [[ ! -d $work/src ]]; then
  (cd "$work" && "$work/venv/bin/pip" download --quiet --no-deps --no-binary=llama-cpp-python llama-cpp-python -d sdist >&2)
  mkdir -p "$work/src"
  tar -xzf "$work"/sdist/llama_cpp_python-*.tar.gz -C "$work/src" --strip-components=1
fi
cd "$work/src/vendor/llama.cpp"
PATH="$work/venv/bin:$PATH" cmake -B "$build" -G Ninja "${isa_flags[@]}" -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF >&2
PATH="$work/venv/bin:$PATH" cmake --build "$build" --target llama-bench llama-quantize llama-perplexity llama-completion llama-tokenize -j"$(nproc)" >&2
echo "$bin"
