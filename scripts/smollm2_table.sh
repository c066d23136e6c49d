#!/usr/bin/env bash
# The NOTES.md table "Real pretrained weights": SmolLM2-135M-Instruct made ternary several ways at
# equal tokens, each scored in bits per byte on tern's validation split of data/train_data.txt and
# on a general-English text that is not FOLDOC (data/english.txt, scripts/fetch_english.sh).
#
#   scripts/smollm2_table.sh OUT_DIR [ROW...]
#
# Rows (all from configs/smollm2-135m.toml; SHORT and LONG steps of 4 x 256 tokens):
#   fp-zero-shot      the GGUF in full precision, no training
#   projection-only   the GGUF projected to ternary, no training
#   fp-ft             full-precision fine-tune (SHORT steps)        fp-ft-long   (LONG steps)
#   qat-ramp          ternary QAT, the quantization ramped in, no distillation (SHORT)
#   qat-distill       the same plus distillation from the FP model: logits and hidden states,
#                     the config's recipe (SHORT)
#   qat-distill-s1    qat-distill, seed 1                              qat-distill-long (LONG)
#   qat-logits        logit distillation only, the recipe before session 13 (SHORT)   qat-logits-long (LONG)
#   qat-ramp-s1       qat-ramp, seed 1                              qat-ramp-long    (LONG)
#   scratch           ternary from scratch at SmolLM2's shape and tokenizer (SHORT)   scratch-long (LONG)
#   scratch-s1        scratch, seed 1
# Finished rows are reused (their eval JSON is kept), so the table can be extended. Each row
# writes OUT_DIR/ROW/{metrics.jsonl,summary.json,eval-val.json,eval-english.json,wall_s}; the table
# goes to OUT_DIR/results.md. Env: SHORT=64, LONG=256, RECIPE="--set k=v ..." (the QAT recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/smollm2_table.sh OUT_DIR [ROW...]}
shift
rows=("$@")
[[ ${#rows[@]} -gt 0 ]] || rows=(fp-zero-shot projection-only fp-ft qat-ramp qat-distill scratch qat-distill-s1 qat-ramp-s1 qat-distill-long fp-ft-long)
short=${SHORT:-64}
long=${LONG:-256}
cfg=configs/smollm2-135m.toml
gguf=data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/fetch_smollm2.sh >&2
scripts/fetch_english.sh >&2
[[ -s data/train_data.txt ]] || scripts/fetch_assets.sh >&2
cargo build --release >&2
tern=${TERN:-./target/release/tern}
mkdir -p "$out"

# The QAT recipe every ternary row shares (configs/smollm2-135m.toml's, unless RECIPE overrides).
read -r -a recipe <<< "${RECIPE:-}"

evaluate() { # MODEL DIR [PRECISION]
  local model=$1 dir=$2 prec=${3:-ternary}
  [[ -s $dir/eval-val.json ]] || $tern eval --model "$model" --precision "$prec" --data data/train_data.txt \
    --split val --config "$cfg" --ctx 257 --json > "$dir/eval-val.json"
  [[ -s $dir/eval-english.json ]] || $tern eval --model "$model" --precision "$prec" --data data/english.txt \
    --ctx 257 --json > "$dir/eval-english.json"
}

train_row() { # NAME STEPS ARGS...
  local name=$1 steps=$2
  shift 2
  local dir=$out/$name
  if [[ ! -s $dir/summary.json ]]; then
    mkdir -p "$dir"
    local t0=$SECONDS
    $tern train --config "$cfg" --quiet --set train.steps="$steps" --set train.out_dir="\"$dir\"" \
      --set checkpoint.every=0 --set checkpoint.keep=1 "$@" > "$dir/train.log" 2>&1
    echo $((SECONDS - t0)) > "$dir/wall_s"
  fi
  # The checkpoint, and its precision: a full-precision fine-tune is scored as it is (eval
  # projects to ternary by default).
  local prec ck
  read -r prec ck < <(python3 -c "import json,sys; d=json.load(open(sys.argv[1]))
print('ternary' if d['ternary'] else 'full', d['checkpoint'])" "$dir/summary.json")
  evaluate "$ck" "$dir" "$prec"
}

# Ternary from scratch at SmolLM2's shape and tokenizer (its own learning rate, no ramp, no teacher).
scratch=(--set model.source='"scratch"' --set model.model_type='"llama"'
  --set model.hidden_size=576 --set model.intermediate_size=1536 --set model.num_hidden_layers=30
  --set model.num_attention_heads=9 --set model.num_key_value_heads=3 --set model.head_dim=64
  --set model.vocab_size=49152 --set model.rope_theta=100000.0 --set model.rms_norm_eps=1e-5
  --set model.max_position_embeddings=8192 --set data.tokenizer="\"$gguf\""
  --set train.distill_alpha=0.0 --set train.distill_hidden=0.0 --set train.ste_ramp_steps=0 --set train.lr=2e-3
  --set train.min_lr=2e-4 --set train.weight_decay=0.1)

for row in "${rows[@]}"; do
  echo "== $row" >&2
  case $row in
    fp-zero-shot) mkdir -p "$out/$row"; evaluate "$gguf" "$out/$row" full ;;
    projection-only) mkdir -p "$out/$row"; evaluate "$gguf" "$out/$row" ternary ;;
    fp-ft) train_row "$row" "$short" --set model.ternary=false --set train.distill_alpha=0.0 --set train.distill_hidden=0.0 \
      --set train.ste_ramp_steps=0 --set train.lr=1e-4 --set train.min_lr=1e-5 ;;
    fp-ft-long) train_row "$row" "$long" --set model.ternary=false --set train.distill_alpha=0.0 --set train.distill_hidden=0.0 \
      --set train.ste_ramp_steps=0 --set train.lr=1e-4 --set train.min_lr=1e-5 ;;
    qat-ramp) train_row "$row" "$short" "${recipe[@]}" --set train.distill_alpha=0.0 --set train.distill_hidden=0.0 ;;
    qat-ramp-s1) train_row "$row" "$short" "${recipe[@]}" --set train.distill_alpha=0.0 --set train.distill_hidden=0.0 \
      --set train.seed=1 --set data.seed=1 ;;
    qat-ramp-long) train_row "$row" "$long" "${recipe[@]}" --set train.distill_alpha=0.0 --set train.distill_hidden=0.0 ;;
    qat-distill) train_row "$row" "$short" "${recipe[@]}" ;;
    qat-distill-s1) train_row "$row" "$short" "${recipe[@]}" --set train.seed=1 --set data.seed=1 ;;
    qat-distill-long) train_row "$row" "$long" "${recipe[@]}" ;;
    qat-logits) train_row "$row" "$short" "${recipe[@]}" --set train.distill_hidden=0.0 ;;
    qat-logits-long) train_row "$row" "$long" "${recipe[@]}" --set train.distill_hidden=0.0 ;;
    scratch) train_row "$row" "$short" "${scratch[@]}" ;;
    scratch-long) train_row "$row" "$long" "${scratch[@]}" ;;
    scratch-s1) train_row "$row" "$short" "${scratch[@]}" --set train.seed=1 --set data.seed=1 ;;
    *) echo "error: unknown row '$row'" >&2; exit 1 ;;
  esac
done

python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = ["| row | steps | tokens | val bpb (FOLDOC) | English bpb | train wall s | tokens/s | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
for name in sorted(os.listdir(out)):
    d = os.path.join(out, name)
    if not os.path.isfile(os.path.join(d, "eval-val.json")):
        continue
    val = json.load(open(os.path.join(d, "eval-val.json")))
    eng = json.load(open(os.path.join(d, "eval-english.json")))
    s = json.load(open(os.path.join(d, "summary.json"))) if os.path.isfile(os.path.join(d, "summary.json")) else {}
    wall = open(os.path.join(d, "wall_s")).read().strip() if os.path.isfile(os.path.join(d, "wall_s")) else ""
    rows.append(f"| {name} | {s.get('steps', 0)} | {s.get('tokens_seen', 0):,} | {val['bpb']:.4f} | {eng['bpb']:.4f} | "
                f"{wall} | {s.get('tokens_per_sec', 0):.1f} | {s.get('peak_rss_gib') or 0:.2f} |")
table = "\n".join(rows)
print(table)
open(os.path.join(out, "results.md"), "w").write(table + "\n")
PY
