#!/usr/bin/env bash
# The first README command: set everything up on a fresh machine and run the main job.
#   1. fetch Qwen3's tokenizer and build data/train_data.txt from FOLDOC (cached in data/)
#   2. build tern in release mode
#   3. train configs/tiny.toml (extra arguments are passed to `tern train`, e.g. --set ...)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_assets.sh
cargo build --release
exec ./target/release/tern train --config configs/tiny.toml "$@"
