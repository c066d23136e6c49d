#!/usr/bin/env bash
# Packed ternary inference on the CPU at the real shape, beside llama.cpp in the same run:
#   1. a checkpoint: MODEL (e.g. a trained ternary SmolLM2), or a random one at ARCH's shape
#      (`tern bench make-model`; random weights are fine for speed; ARCH = qwen3-0.6b, the
#      default, or smollm2-135m), exported by tern as Q2_0 (what tern runs) and F16;
#   2. llama.cpp (scripts/build_llama_cpp.sh) quantizes the F16 export to TQ2_0, its fastest
#      ternary type, and runs llama-bench on TQ2_0 and on tern's Q2_0 file;
#   3. `tern bench decode --gguf --json` and llama-bench at each thread count, plus the
#      machine's read bandwidth (scripts/membw.c) for the decode bound;
#   4. results.md (a table with the ratios) and the raw JSON lines in OUT_DIR.
#   Both sides report the mean and standard deviation of REPS timed repetitions (llama-bench -r).
# Usage: scripts/bench_packed.sh [OUT_DIR]
#   env: THREADS="1 2", PROMPT=64, GEN=32, REPS=5, ARCH=qwen3-0.6b|smollm2-135m, MODEL=checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-packed}
threads=${THREADS:-1 2}
prompt=${PROMPT:-64}
gen=${GEN:-32}
reps=${REPS:-5}
mkdir -p "$out"
cargo build --release >&2
tern=./target/release/tern
arch=${ARCH:-qwen3-0.6b}
case $arch in
  qwen3-0.6b) [[ -s data/tokenizer.json ]] || scripts/fetch_assets.sh >&2; tok=data/tokenizer.json ;;
  smollm2-135m) scripts/fetch_smollm2.sh >&2; tok=data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ;;
  *) echo "error: ARCH=$arch: expected qwen3-0.6b or smollm2-135m" >&2; exit 1 ;;
esac
model=${MODEL:-$out/$arch-random}
[[ -f $model/model.safetensors ]] || $tern bench make-model --arch "$arch" --out "$model" --tokenizer "$tok"
[[ -f $out/q2_0.gguf ]] || $tern export --model "$model" --out "$out/q2_0.gguf"
[[ -f $out/f16.gguf ]] || $tern export --model "$model" --out "$out/f16.gguf" --format f16
bin=$(scripts/build_llama_cpp.sh | tail -n 1)
[[ -f $out/tq2_0.gguf ]] || "$bin/llama-quantize" "$out/f16.gguf" "$out/tq2_0.gguf" TQ2_0 >&2
gcc -O3 -march=native -fopenmp scripts/membw.c -o "$out/membw"

: > "$out/tern.jsonl"
: > "$out/llama.jsonl"
: > "$out/membw.txt"
for t in $threads; do
  echo "$t $("$out/membw" "$t")" >> "$out/membw.txt"
  # Separate processes: each load and RSS is its own.
  $tern bench decode --gguf "$out/q2_0.gguf" --prompt "$prompt" -n "$gen" -r "$reps" --threads "$t" --json >> "$out/tern.jsonl"
  "$bin/llama-bench" -m "$out/tq2_0.gguf" -m "$out/q2_0.gguf" -p "$prompt" -n "$gen" -r "$reps" -t "$t" -o jsonl >> "$out/llama.jsonl"
done
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
flags=$(grep -m1 "^flags" /proc/cpuinfo | tr ' ' '\n' | grep -E "^(avx2|avx512f|avx512_vnni|avx_vnni|avx512_bf16|amx_tile|amx_bf16)$" | tr '\n' ' ')
python3 - "$out" "$cpu" "$flags" "$(basename "$model")" <<'PY'
import json, os, sys
out, cpu, flags, model = sys.argv[1:5]
tern = [json.loads(l) for l in open(f"{out}/tern.jsonl")]
llama = [json.loads(l) for l in open(f"{out}/llama.jsonl")]
bw = {int(l.split()[0]): float(l.split()[1]) for l in open(f"{out}/membw.txt")}
q2_bytes = os.path.getsize(f"{out}/q2_0.gguf")
rows = ["| threads | tern Q2_0 prefill tok/s | tern decode tok/s | llama.cpp TQ2_0 prefill | TQ2_0 decode | llama.cpp Q2_0 prefill | Q2_0 decode | decode vs TQ2_0 | prefill vs TQ2_0 | read GB/s | decode bound tok/s | tern decode / bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for t in tern:
    n = t["threads"]
    def llama_rate(name, gen):
        for r in llama:
            if r["n_threads"] == n and os.path.basename(r["model_filename"]) == name and (r["n_gen"] > 0) == gen:
                return r["avg_ts"], r["stddev_ts"]
        return float("nan"), float("nan")
    tq_p, tq_d = llama_rate("tq2_0.gguf", False), llama_rate("tq2_0.gguf", True)
    q2_p, q2_d = llama_rate("q2_0.gguf", False), llama_rate("q2_0.gguf", True)
    bound = bw.get(n, float("nan")) * 1e9 / q2_bytes
    pm = lambda r: f"{r[0]:.1f} ± {r[1]:.1f}"
    tp, td = (t["prefill_tok_s"], t.get("prefill_tok_s_sd", 0.0)), (t["decode_tok_s"], t.get("decode_tok_s_sd", 0.0))
    rows.append(f"| {n} | {pm(tp)} | {pm(td)} | {pm(tq_p)} | {pm(tq_d)} | {pm(q2_p)} | {pm(q2_d)} | "
                f"{td[0]/tq_d[0]:.2f}x | {tp[0]/tq_p[0]:.2f}x | {bw.get(n, float('nan')):.1f} | {bound:.0f} | {td[0]/bound:.0%} |")
table = f"CPU: {cpu} ({os.cpu_count()} cores; {flags.strip()}); model: {model}\n\n" + "\n".join(rows)
print(table)
open(f"{out}/results.md", "w").write(table + "\n")
PY
