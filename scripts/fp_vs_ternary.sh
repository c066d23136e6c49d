#!/usr/bin/env bash
# Full precision vs ternary at the tiny default's shape and EQUAL TOTAL TOKENS (issue 16), two
# seeds each; prints a markdown table of validation bits per byte:
#   fp             configs/tiny.toml with model.ternary = false, all the default's steps
#   ternary        configs/tiny.toml as is (ternary from scratch), all steps
#   fp -> ternary  configs/tiny-fp.toml (full precision, the first half of the steps), then
#                  configs/tiny-from-fp.toml (ternary, quantization ramped in, the second half)
#   [STEPS=N] scripts/fp_vs_ternary.sh OUT_DIR   (needs target/release/tern and the default's data)
# STEPS (default: configs/tiny.toml's) is the total for every row; warmup is 5% of each run.
# A run whose summary.json exists is not rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/fp_vs_ternary.sh OUT_DIR}
SEEDS=${SEEDS:-"0 1"}
TERN=./target/release/tern
N=${STEPS:-$(sed -n 's/^steps *= *\([0-9]*\).*/\1/p' configs/tiny.toml | head -1)}
HALF=$((N / 2))
FT=$((N - HALF))
mkdir -p "$OUT"
run() {  # run NAME CONFIG [--set ...]
  local name=$1 cfg=$2; shift 2
  [ -f "$OUT/$name/summary.json" ] && return
  $TERN train --config "$cfg" --quiet --set train.out_dir="\"$OUT/$name\"" \
    --set eval.every=0 --set eval.batches=0 "$@" >"$OUT/$name.log" 2>&1
}
for s in $SEEDS; do
  seed=(--set train.seed="$s" --set data.seed="$s")
  all=(--set train.steps="$N" --set train.warmup_steps="$((N / 20))")
  run "fp-s$s" configs/tiny.toml --set model.ternary=false "${seed[@]}" "${all[@]}"
  run "ternary-s$s" configs/tiny.toml "${seed[@]}" "${all[@]}"
  run "fp-half-s$s" configs/tiny-fp.toml "${seed[@]}" --set train.steps="$HALF" --set train.warmup_steps="$((HALF / 20))"
  run "fp-to-ternary-s$s" configs/tiny-from-fp.toml "${seed[@]}" --set train.steps="$FT" \
    --set train.warmup_steps="$((FT / 20))" --set train.ste_ramp_steps="$((FT / 10))" \
    --set model.source="\"$OUT/fp-half-s$s/checkpoints/step-$(printf %08d "$HALF")\""
done
python3 - "$OUT" "$SEEDS" <<'PY'
import json, os, sys, statistics as st
out, seeds = sys.argv[1], sys.argv[2].split()
def bpb(name):
    return [json.load(open(os.path.join(out, f"{name}-s{s}", "summary.json")))["val_bpb"] for s in seeds]
rows = [("full precision", bpb("fp")), ("ternary from scratch", bpb("ternary")),
        ("full precision, then ternary", bpb("fp-to-ternary"))]
fp = st.mean(rows[0][1])
print("| run | val bpb (each seed) | mean | spread | vs full precision |")
print("|---|---|---:|---:|---:|")
for name, b in rows:
    print("| %s | %s | %.4f | %.4f | %+.1f%% |" % (name, ", ".join("%.4f" % x for x in b), st.mean(b),
                                               max(b) - min(b), 100 * (st.mean(b) - fp) / fp))
PY
