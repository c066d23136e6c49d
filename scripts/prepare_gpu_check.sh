#!/usr/bin/env bash
# Prepares the one-command GPU check (issue 14) on a machine WITHOUT a GPU: builds the CUDA
# binary and the CUDA test executable (scripts/build_cuda.sh), then packs into build/gpu/ what
# the GPU machine needs and cannot build (it has no Rust and no registries):
#   tern.gz, devices-test.gz (tests/devices.rs), tokenizer.json.gz, train_data.txt.gz
# compressed (the CUDA binary with its symbol table but no debug info is ~80 MB, mostly candle's
# kernel images; ~21 MB gzipped) to stay under the 64 MiB a device call carries. Then run, there:
#   scripts/gpu_check.sh RESULTS_DIR        (with `build/gpu` carried)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f data/tokenizer.json ] && [ -f data/train_data.txt ] || scripts/fetch_assets.sh
BIN=$(scripts/build_cuda.sh --bin tern --test devices | tail -1)
TEST=$(ls -t target/cuda/release/deps/devices-* | grep -v '\.d$' | head -1)
rm -rf build/gpu && mkdir -p build/gpu
# The binary keeps its symbol table (+1.6 MB gzipped): stack samples on the GPU machine
# (gpu_check.sh, cuda-gdb) then name tern's and candle's functions.
cp "$BIN" build/gpu/tern && gzip -9 build/gpu/tern
strip -o build/gpu/devices-test "$TEST" && gzip -9 build/gpu/devices-test
gzip -9 -c data/tokenizer.json > build/gpu/tokenizer.json.gz
gzip -9 -c data/train_data.txt > build/gpu/train_data.txt.gz
git rev-parse HEAD > build/gpu/COMMIT 2>/dev/null || true
du -ch build/gpu/* | tail -1 >&2
ls -la build/gpu >&2
echo "build/gpu"
