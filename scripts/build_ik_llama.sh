#!/usr/bin/env bash
# Builds ik_llama.cpp's llama-bench and llama-quantize (its IQ2_BN / IQ1_BN ternary types, the
# strongest llama.cpp-family ternary CPU kernels) from a source tree of the public repository
# ikawrakow/ik_llama.cpp that the caller supplies (no registry ships it), with cmake and ninja from
# PyPI in a venv. Idempotent; the last line printed is the directory holding the binaries.
#   scripts/build_ik_llama.sh SRC_DIR [WORKDIR]   (default WORKDIR: build/ik_llama, ignored by git)
#   SRC_DIR: a checkout, or a git directory (a bare mirror: its HEAD is exported into WORKDIR/src).
#   env LLAMA_ISA=avx2: for AVX2 + FMA only, in WORKDIR/build-avx2 (as scripts/build_llama_cpp.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:?usage: scripts/build_ik_llama.sh SRC_DIR [WORKDIR]}
work=${2:-build/ik_llama}
mkdir -p "$work"
work=$(cd "$work" && pwd)
case ${LLAMA_ISA:-native} in
  native) build=build; isa_flags=(-DGGML_NATIVE="${NATIVE:-ON}") ;;
  avx2) build=build-avx2
    isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
      -DGGML_AVX512=OFF -DGGML_AVXVNNI=OFF) ;;
  *) echo "error: LLAMA_ISA=$LLAMA_ISA: expected native or avx2" >&2; exit 1 ;;
esac
bin="$work/$build/bin"
if [[ -x $bin/llama-bench && -x $bin/llama-quantize ]]; then
  echo "$bin"; exit 0
fi
if [[ ! -f $src/CMakeLists.txt ]]; then
  if git --git-dir="$src" rev-parse --verify -q HEAD > /dev/null; then
    rm -rf "$work/src" && mkdir -p "$work/src"
    # A snapshot may lack its largest blobs (web UI assets the build does not use): leave out
    # the paths whose objects are missing.
    excludes=()
    tree=$(git --git-dir="$src" ls-tree -r HEAD)
    for obj in $(awk '{print $3}' <<< "$tree" | git --git-dir="$src" cat-file --batch-check \
      | awk '$2 == "missing" {print $1}'); do
      excludes+=(":(exclude)$(awk -v o="$obj" '$3 == o {print $4; exit}' <<< "$tree")")
    done
    git --git-dir="$src" archive HEAD -- . "${excludes[@]}" | tar -x -C "$work/src"
    git --git-dir="$src" rev-parse HEAD > "$work/src/COMMIT"
    src=$work/src
  else
    echo "error: $src: expected an ik_llama.cpp source tree (CMakeLists.txt) or its git directory" >&2
    exit 1
  fi
fi
if [[ ! -x $work/venv/bin/cmake ]]; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install --quiet cmake ninja >&2
fi
# The examples switch carries llama-bench and llama-quantize in this tree.
PATH="$work/venv/bin:$PATH" cmake -S "$src" -B "$work/$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
  "${isa_flags[@]}" >&2
PATH="$work/venv/bin:$PATH" cmake --build "$work/$build" --target llama-bench llama-quantize -j"$(nproc)" >&2
echo "$bin"
