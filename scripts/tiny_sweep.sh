#!/usr/bin/env bash
# The tiny default's shape by measurement (issue 16): each candidate (vocab x width x depth)
# trains for the SAME wall-time budget (steps = budget x its measured tokens/s / tokens per step,
# fixed in the table below so reruns are deterministic), two seeds each; prints bits per byte.
#   scripts/tiny_sweep.sh OUT_DIR            (needs target/release/tern and data/train_data.txt;
#                                             fits data/foldoc-VOCAB.json where missing)
# Rows: name vocab hidden ffn layers head_dim steps. Heads: hidden/head_dim, KV heads half of them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/tiny_sweep.sh OUT_DIR}
SEEDS=${SEEDS:-"0 1"}
ROWS=${ROWS:-"v4096-w128-d4 4096 128 384 4 32 1234
v8192-w128-d4 8192 128 384 4 32 777
v4096-w256-d4 4096 256 768 4 64 593
v8192-w256-d4 8192 256 768 4 64 414
v4096-w192-d6 4096 192 576 6 48 596"}
mkdir -p "$OUT"
while read -r name vocab hidden ffn layers hd steps; do
  [ -z "$name" ] && continue
  scripts/foldoc_tokenizer.sh "$vocab" >/dev/null
  heads=$((hidden / hd))
  for seed in $SEEDS; do
    run="$OUT/$name-s$seed"
    [ -f "$run/summary.json" ] && continue
    ./target/release/tern train --config configs/tiny.toml --quiet \
      --set model.vocab_size="$vocab" --set data.tokenizer="\"data/foldoc-$vocab.json\"" \
      --set model.hidden_size="$hidden" --set model.intermediate_size="$ffn" \
      --set model.num_hidden_layers="$layers" --set model.head_dim="$hd" \
      --set model.num_attention_heads="$heads" --set model.num_key_value_heads="$((heads / 2))" \
      --set train.steps="$steps" --set train.warmup_steps="$((steps / 20))" \
      --set train.seed="$seed" --set data.seed="$seed" \
      --set eval.every=0 --set eval.batches=0 --set checkpoint.every=0 \
      --set train.out_dir="\"$run\"" >"$run.log" 2>&1
  done
done <<<"$ROWS"
python3 - "$OUT" <<'PY'
import json, sys, glob, os, statistics as st
rows = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*-s*/summary.json"))):
    s = json.load(open(f))
    name = os.path.basename(os.path.dirname(f)).rsplit("-s", 1)[0]
    rows.setdefault(name, []).append(s)
print("| shape | steps | tokens | train s (each seed) | val bpb (each seed) | mean bpb |")
print("|---|---:|---:|---|---|---:|")
for name, ss in rows.items():
    b = [s["val_bpb"] for s in ss]
    secs = ", ".join("%.0f" % s["elapsed_s"] for s in ss)
    bpbs = ", ".join("%.4f" % x for x in b)
    print("| %s | %d | %d | %s | %s | %.4f |" % (name, ss[0]["steps"], ss[0]["tokens_seen"], secs, bpbs, st.mean(b)))
PY
