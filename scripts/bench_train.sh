#!/usr/bin/env bash
# Training speed beside PyTorch on this CPU, in one run: `tern bench step` and
# scripts/pytorch_step.py (transformers' model with the same ternary STE projection, AdamW,
# clipping; f32 and bf16 autocast) at the Qwen3-0.6B and SmolLM2-135M shapes, batch 1 x 512 and
# 4 x 256: tokens/s (median of the steps after a warm-up: 5 steps by default, since at the 0.6B
# shape the first step after the warm-up still faults in memory on both sides and runs ~1.5x
# slower than the ones after it) and peak RSS. tern's bf16 row is tried
# too: where the CPU build refuses bf16 the table says so. PyTorch comes from PyPI into a venv
# this script makes (scripts/setup_pytorch.sh). Writes runs.jsonl and results.md (CPU model and
# its flags) in OUT_DIR.
# Usage: scripts/bench_train.sh [OUT_DIR]
#   env: THREADS=2 STEPS=5 SHAPES="qwen3-0.6b smollm2-135m" BATCHES="1x512 4x256"
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-train}
threads=${THREADS:-2}
steps=${STEPS:-5}
shapes=${SHAPES:-qwen3-0.6b smollm2-135m}
batches=${BATCHES:-1x512 4x256}
mkdir -p "$out"
cargo build --release >&2
tern=./target/release/tern
py=$(scripts/setup_pytorch.sh)
: > "$out/runs.jsonl"

# Appends one JSON line: the last line of a run's output (its JSON summary) with the engine and
# dtype named, or the run's last line of error output when it failed.
record() { # ENGINE DTYPE SHAPE B S LOG STATUS
  python3 - "$@" >> "$out/runs.jsonl" <<'PY'
import json, sys
engine, dtype, shape, b, s, log, status = sys.argv[1:]
lines = [l for l in open(log).read().splitlines() if l.strip()]
row = {"engine": engine, "dtype": dtype, "shape": shape, "batch": int(b), "seq": int(s)}
last = lines[-1] if lines else ""
if status == "0" and last.startswith("{"):
    d = json.loads(last)
    row.update(tokens_per_s=d.get("tokens_per_s"), peak_rss_gib=d.get("peak_rss_gib"),
               loss_first=d.get("loss_first"), loss_last=d.get("loss_last"))
else:
    row["refused"] = last.removeprefix("Error: ").removeprefix("error: ").strip()[:300]
print(json.dumps(row))
PY
}

for shape in $shapes; do
  for bs in $batches; do
    b=${bs%x*}
    s=${bs#*x}
    for dtype in f32 bf16; do
      echo "== tern $shape ${b}x$s $dtype" >&2
      log=$out/tern-$shape-$bs-$dtype.log
      st=0
      $tern --threads "$threads" bench step --arch "$shape" --batch "$b" --seq "$s" \
        --steps "$steps" --dtype "$dtype" --json > "$log" 2>&1 || st=$?
      record tern "$dtype" "$shape" "$b" "$s" "$log" "$st"
      echo "== pytorch $shape ${b}x$s $dtype" >&2
      log=$out/pytorch-$shape-$bs-$dtype.log
      st=0
      "$py" scripts/pytorch_step.py --arch "$shape" --batch "$b" --seq "$s" --steps "$steps" \
        --threads "$threads" --dtype "$dtype" > "$log" 2>&1 || st=$?
      record pytorch "$dtype" "$shape" "$b" "$s" "$log" "$st"
    done
  done
done

python3 - "$out" "$threads" <<'PY'
import json, os, sys
out, threads = sys.argv[1], sys.argv[2]
info = open("/proc/cpuinfo").read().split("\n\n")[0]
field = lambda k: next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith(k)), "?")
flags = [f for f in field("flags").split() if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma"))]
rows = [json.loads(l) for l in open(os.path.join(out, "runs.jsonl"))]
by = {(r["engine"], r["dtype"], r["shape"], r["batch"], r["seq"]): r for r in rows}
lines = [f"CPU: {field('model name')} (CPUID model {field('model')}), {threads} threads; flags: {' '.join(sorted(flags))}", "",
         "| shape | batch x seq | engine | dtype | tokens/s | peak RSS GiB | tern / PyTorch (same dtype) | tern f32 / PyTorch bf16 |",
         "|---|---|---|---|---:|---:|---:|---:|"]
for r in rows:
    key = (r["shape"], r["batch"], r["seq"])
    tps = r.get("tokens_per_s")
    cell = f"{tps:.1f}" if tps else "refused: " + r.get("refused", "?")
    rss = f"{r['peak_rss_gib']:.2f}" if r.get("peak_rss_gib") else ""
    ratio = best = ""
    if r["engine"] == "tern" and tps:
        peer = by.get(("pytorch", r["dtype"]) + key, {}).get("tokens_per_s")
        ratio = f"{tps / peer:.2f}x" if peer else ""
        bf = by.get(("pytorch", "bf16") + key, {}).get("tokens_per_s")
        best = f"{tps / bf:.2f}x" if bf and r["dtype"] == "f32" else ""
    lines.append(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['engine']} | {r['dtype']} | {cell} | {rss} | {ratio} | {best} |")
open(os.path.join(out, "results.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
