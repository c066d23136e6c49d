#!/usr/bin/env bash
# The AArch64 NEON (`sdot`) packed kernel, tested on this x86 machine: the library's kernel tests
# cross-compiled for aarch64-unknown-linux-gnu and run under qemu-user with a CPU model that has
# the dot-product extension (QEMU_CPU=max). TERN_REQUIRE_ISA=neondot makes the run fail if the
# kernel was not offered (the tests would otherwise pass on the portable kernel alone). The paged
# attention tests run there too (its plain loops, fused multiply-adds on AArch64).
# Installs what it needs when missing: the rustup target, and (Debian, as root) qemu-user and the
# aarch64 cross C toolchain (the linker; C code of dependencies). Also clippy on that target (the
# x86 run never compiles the aarch64-only code). Part of scripts/check.sh.
#   scripts/test_neon.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
if ! command -v qemu-aarch64 > /dev/null || ! command -v aarch64-linux-gnu-gcc > /dev/null \
  || [[ ! -d /usr/aarch64-linux-gnu/lib ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get > /dev/null; then
    apt-get install -y -q qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross > /dev/null \
      || { apt-get update -q > /dev/null && apt-get install -y -q qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross > /dev/null; }
  else
    echo "error: scripts/test_neon.sh needs qemu-aarch64 and aarch64-linux-gnu-gcc (Debian: apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross)" >&2
    exit 1
  fi
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export QEMU_CPU=max TERN_REQUIRE_ISA=neondot
# Lints of the aarch64-only code (the x86 clippy run never sees it), then the kernel tests.
cargo clippy --release --target "$target" --lib -- -D warnings
cargo test --release --target "$target" --lib -- kernels::ternary_matmul decode::paged
