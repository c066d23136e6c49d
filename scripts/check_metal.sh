#!/usr/bin/env bash
# Type-checks the Metal build for Apple Silicon on any Linux machine: the library, the binary and
# the tests with `--features metal` for aarch64-apple-darwin (`cargo check`, which never links).
# Part of scripts/check.sh, like the CUDA build.
#
# The Rust code is checked for real (objc2 and candle's Metal backend included). C code that
# build scripts compile (ring under hf-hub's TLS, mimalloc) cannot be built here: no macOS SDK.
# `cargo check` never links, so that code's object files are never used; the script hands those
# build scripts a stand-in compiler that writes empty objects for the target. What this does not
# check: the C code itself (it is upstream's, compiled on a Mac by scripts/mac_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-apple-darwin
rustup target list --installed | grep -qx "$target" || rustup target add "$target" >&2
cc_dir=$PWD/build/metal-cc
mkdir -p "$cc_dir"
cat > "$cc_dir/cc" <<'CC'
#!/bin/sh
# Stand-in C compiler for type-checking a macOS target: writes an empty object where the
# command names one (-o FILE, -oFILE, or MSVC's -FoFILE: cc-rs may take a stub it cannot identify
# for MSVC; the flags do not matter, nothing is compiled).
out=
while [ $# -gt 0 ]; do
  case $1 in
    -o) out=$2; shift ;;
    -o*) out=${1#-o} ;;
    -Fo*) out=${1#-Fo} ;;
  esac
  shift
done
[ -n "$out" ] && : > "$out"
exit 0
CC
chmod +x "$cc_dir/cc"
export CC_aarch64_apple_darwin=$cc_dir/cc CXX_aarch64_apple_darwin=$cc_dir/cc AR_aarch64_apple_darwin=ar
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_METAL:-target/metal}
cargo check --release --features metal --target "$target" --lib --bins --tests "$@"
echo "check_metal: the metal build type-checks for $target"
