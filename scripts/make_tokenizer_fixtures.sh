#!/usr/bin/env bash
# Token ids of tests/fixtures/tokenize/*.txt as stock llama.cpp computes them with SmolLM2's GGUF
# tokenizer (`llama-tokenize --ids --no-escape`, no BOS: the file says add_bos_token = false), for
# tests/gguf_tokenizer.rs. Needs scripts/build_llama_cpp.sh and scripts/fetch_smollm2.sh.
#   scripts/make_tokenizer_fixtures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(scripts/build_llama_cpp.sh | tail -1)
scripts/fetch_smollm2.sh >/dev/null
gguf=data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
for f in tests/fixtures/tokenize/*.txt; do
  "$bin/llama-tokenize" -m "$gguf" -f "$f" --ids --no-escape --log-disable 2>/dev/null | tail -1 \
    > "${f%.txt}.smollm2.ids.json"
  echo "$f: $(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "${f%.txt}.smollm2.ids.json") ids"
done
