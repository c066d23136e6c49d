#!/usr/bin/env bash
# llama.cpp's llama-server (the OpenAI-compatible server tern serve is measured beside), from the
# same llama-cpp-python sdist as scripts/build_llama_cpp.sh, in a build directory of its own.
# Idempotent; the last line printed is the directory holding llama-server.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(scripts/build_llama_cpp.sh "$@" | tail -n 1)
src=$(cd "$bin/../.." && pwd)
venv=$(cd "$src/../../../venv" && pwd)
out="$src/build-server/bin"
if [[ -x $out/llama-server ]]; then
  echo "$out"; exit 0
fi
PATH="$venv/bin:$PATH" cmake -S "$src" -B "$src/build-server" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF >&2
PATH="$venv/bin:$PATH" cmake --build "$src/build-server" --target llama-server -j"$(nproc)" >&2
echo "$out"
