#!/usr/bin/env bash
# The first README command: set everything up on a fresh machine and run the main job.
#   1. fetch Qwen3's tokenizer and build data/train_data.txt from FOLDOC (cached in data/)
#   2. build tern in release mode
#   3. fit the tiny default's own tokenizer to the corpus (the vocab size configs/tiny.toml sets)
#   4. train configs/tiny.toml (extra arguments are passed to `tern train`, e.g. --set ...)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_assets.sh
cargo build --release
scripts/foldoc_tokenizer.sh "$(python3 -c 'import tomllib; print(tomllib.load(open("configs/tiny.toml", "rb"))["model"]["vocab_size"])')"
exec ./target/release/tern train --config configs/tiny.toml "$@"
