#!/usr/bin/env bash
# Fits the corpus tokenizer data/foldoc-VOCAB.json to data/train_data.txt (a byte-level BPE of
# exactly VOCAB tokens; deterministic, ~4 s), unless it exists. Needs target/release/tern.
#   scripts/foldoc_tokenizer.sh VOCAB
set -euo pipefail
cd "$(dirname "$0")/.."
V=${1:?usage: scripts/foldoc_tokenizer.sh VOCAB}
OUT=data/foldoc-$V.json
if [ -s "$OUT" ]; then echo "tokenizer: $OUT exists"; exit 0; fi
./target/release/tern tokenizer train --data data/train_data.txt --vocab-size "$V" --out "$OUT"
