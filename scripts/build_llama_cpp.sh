#!/usr/bin/env bash
# Builds stock llama.cpp's llama-bench, llama-quantize, llama-perplexity, llama-completion and
# llama-tokenize from the copy vendored in the llama-cpp-python sdist on PyPI (the only route to
# llama.cpp's source here), with cmake and ninja from PyPI in a venv. Idempotent; the last line printed is the
# directory holding the binaries.
#   scripts/build_llama_cpp.sh [WORKDIR]   (default: build/llama.cpp, ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-build/llama.cpp}
mkdir -p "$work"
work=$(cd "$work" && pwd)
bin="$work/src/vendor/llama.cpp/build/bin"
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
PATH="$work/venv/bin:$PATH" cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF >&2
PATH="$work/venv/bin:$PATH" cmake --build build --target llama-bench llama-quantize llama-perplexity llama-completion llama-tokenize -j"$(nproc)" >&2
echo "$bin"
