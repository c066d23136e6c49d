#!/usr/bin/env bash
# Packed ternary inference on the CPU at the real shape, beside llama.cpp in the same run:
#   1. a checkpoint: MODEL (e.g. a trained ternary SmolLM2), or a random one at ARCH's shape
#      (`tern bench make-model`; random weights are fine for speed; ARCH = qwen3-0.6b, the
#      default, or smollm2-135m), exported by tern as Q2_0 (what tern runs) and F16;
#   2. llama.cpp (scripts/build_llama_cpp.sh) quantizes the F16 export to TQ2_0, its fastest
#      ternary type, and runs llama-bench on TQ2_0 and on tern's Q2_0 file;
#   3. `tern bench decode --gguf --json` and llama-bench at each thread count, plus the
#      machine's read bandwidth (scripts/membw.c) for the decode bound;
#   4. with IK_LLAMA set (a source tree or git directory of the public ikawrakow/ik_llama.cpp,
#      built by scripts/build_ik_llama.sh), its IQ2_BN and IQ1_BN of the same F16 export too,
#      with and without its run-time repacking to the row-interleaved _R4 layout (`-rtr 1`);
#   5. results.md (the CPU model and flags, a table with the ratios) and the raw JSON in OUT_DIR.
#   Every side reports the mean and standard deviation of REPS timed repetitions (llama-bench -r).
#   Prompt processing and decode run as separate llama-bench calls: a peer that crashes in one
#   (stock llama.cpp's prompt test dies with "Illegal instruction" on some AMX CPUs) leaves its
#   cell empty ("n/a") and the rest of the table stands.
# Usage: scripts/bench_packed.sh [OUT_DIR]
#   env: THREADS="1 2", PROMPT=64, GEN=32, REPS=5, ARCH=qwen3-0.6b|smollm2-135m, MODEL=checkpoint,
#        IK_LLAMA=path (optional), IK_TYPES="IQ2_BN IQ1_BN"
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
ik_types=()
if [[ -n ${IK_LLAMA:-} ]]; then
  ik_bin=$(scripts/build_ik_llama.sh "$IK_LLAMA" | tail -n 1)
  read -r -a ik_types <<< "${IK_TYPES:-IQ2_BN IQ1_BN}"
  for ty in "${ik_types[@]}"; do
    f=$out/ik-${ty,,}.gguf
    [[ -f $f ]] || "$ik_bin/llama-quantize" "$out/f16.gguf" "$f" "$ty" >&2
  done
fi
gcc -O3 -march=native -fopenmp scripts/membw.c -o "$out/membw"

# llama-bench FORMAT ARGS...: one prompt test and one decode test, each its own process, JSON
# objects one per line; a crash is reported and leaves its figure out.
bench_peer() {
  local bin=$1 fmt=$2
  shift 2
  for test in "-p $prompt -n 0" "-p 0 -n $gen"; do
    # shellcheck disable=SC2086
    if ! "$bin/llama-bench" "$@" $test -r "$reps" -o "$fmt" > "$out/peer.tmp" 2> "$out/peer.err"; then
      echo "warning: $bin/llama-bench $* $test failed: $(tail -n 1 "$out/peer.err")" >&2
      continue
    fi
    if [[ $fmt == json ]]; then
      python3 -c "import json,sys; [print(json.dumps(r)) for r in json.load(open(sys.argv[1]))]" "$out/peer.tmp"
    else
      cat "$out/peer.tmp"
    fi
  done
}

: > "$out/tern.jsonl"
: > "$out/llama.jsonl"
: > "$out/ik.jsonl"
: > "$out/membw.txt"
for t in $threads; do
  echo "$t $("$out/membw" "$t")" >> "$out/membw.txt"
  # Separate processes: each load and RSS is its own.
  $tern bench decode --gguf "$out/q2_0.gguf" --prompt "$prompt" -n "$gen" -r "$reps" --threads "$t" --json >> "$out/tern.jsonl"
  bench_peer "$bin" jsonl -m "$out/tq2_0.gguf" -m "$out/q2_0.gguf" -t "$t" >> "$out/llama.jsonl"
  for ty in "${ik_types[@]}"; do
    for rtr in 0 1; do
      bench_peer "$ik_bin" json -m "$out/ik-${ty,,}.gguf" -t "$t" -rtr "$rtr" >> "$out/ik.jsonl"
    done
  done
done
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
flags=$(grep -m1 "^flags" /proc/cpuinfo | tr ' ' '\n' | grep -E "^(avx2|avx512f|avx512_vnni|avx_vnni|avx512_bf16|amx_tile|amx_bf16)$" | tr '\n' ' ')
python3 - "$out" "$cpu" "$flags" "$(basename "$model")" <<'PY'
import json, os, sys
out, cpu, flags, model = sys.argv[1:5]
nan = (float("nan"), float("nan"))
load = lambda name: [json.loads(l) for l in open(f"{out}/{name}") if l.strip()]
tern, llama, ik = load("tern.jsonl"), load("llama.jsonl"), load("ik.jsonl")
bw = {int(l.split()[0]): float(l.split()[1]) for l in open(f"{out}/membw.txt")}
q2_bytes = os.path.getsize(f"{out}/q2_0.gguf")
pm = lambda r: "n/a" if r[0] != r[0] else f"{r[0]:.1f} ± {r[1]:.1f}"
ratio = lambda a, b: "n/a" if a != a or b != b else f"{a / b:.2f}x"

def rate(runs, name, n, gen, repack=None):
    for r in runs:
        if (r["n_threads"] == n and os.path.basename(r["model_filename"]) == name
                and (r["n_gen"] > 0) == gen and (repack is None or bool(r.get("repack")) == repack)):
            return r["avg_ts"], r["stddev_ts"]
    return nan

rows = ["| threads | tern Q2_0 prefill tok/s | tern decode tok/s | llama.cpp TQ2_0 prefill | TQ2_0 decode | llama.cpp Q2_0 prefill | Q2_0 decode | decode vs TQ2_0 | prefill vs TQ2_0 | read GB/s | decode bound tok/s | tern decode / bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
ik_names = sorted({os.path.basename(r["model_filename"]) for r in ik})
ik_rows = ["| threads | ik_llama type | prefill tok/s | decode tok/s | tern prefill vs it | tern decode vs it |",
           "|---:|---|---:|---:|---:|---:|"]
for t in tern:
    n = t["threads"]
    tq_p, tq_d = rate(llama, "tq2_0.gguf", n, False), rate(llama, "tq2_0.gguf", n, True)
    q2_p, q2_d = rate(llama, "q2_0.gguf", n, False), rate(llama, "q2_0.gguf", n, True)
    bound = bw.get(n, float("nan")) * 1e9 / q2_bytes
    tp, td = (t["prefill_tok_s"], t.get("prefill_tok_s_sd", 0.0)), (t["decode_tok_s"], t.get("decode_tok_s_sd", 0.0))
    rows.append(f"| {n} | {pm(tp)} | {pm(td)} | {pm(tq_p)} | {pm(tq_d)} | {pm(q2_p)} | {pm(q2_d)} | "
                f"{ratio(td[0], tq_d[0])} | {ratio(tp[0], tq_p[0])} | {bw.get(n, float('nan')):.1f} | {bound:.0f} | {td[0]/bound:.0%} |")
    for name in ik_names:
        for repack in (False, True):
            p, d = rate(ik, name, n, False, repack), rate(ik, name, n, True, repack)
            label = name.removeprefix("ik-").removesuffix(".gguf").upper() + (" (-rtr 1: _R4)" if repack else "")
            ik_rows.append(f"| {n} | {label} | {pm(p)} | {pm(d)} | {ratio(tp[0], p[0])} | {ratio(td[0], d[0])} |")
table = f"CPU: {cpu} ({os.cpu_count()} cores; {flags.strip()}); model: {model}\n\n" + "\n".join(rows)
if ik_names:
    table += "\n\nik_llama.cpp on the same F16 export, quantized by its llama-quantize:\n\n" + "\n".join(ik_rows)
print(table)
open(f"{out}/results.md", "w").write(table + "\n")
PY
