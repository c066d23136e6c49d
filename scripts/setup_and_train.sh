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
# The vocabulary size configs/tiny.toml sets (its `vocab_size = N` line).
vocab=$(sed -n 's/^vocab_size *= *\([0-9]*\).*/\1/p' configs/tiny.toml | head -1)
scripts/foldoc_tokenizer.sh "$vocab"
exec ./target/release/tern train --config configs/tiny.toml "$@"
