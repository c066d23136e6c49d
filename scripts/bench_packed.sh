#!/usr/bin/env bash
# Packed ternary inference on the CPU at the real shape, beside llama.cpp in the same run:
#   1. a checkpoint: MODEL (e.g. a trained ternary SmolLM2), or a random one at ARCH's shape
#      (`tern bench make-model`; random weights are fine for speed; ARCH = qwen3-0.6b, the
#      default, or smollm2-135m), exported by tern as Q2_0 (what tern runs) and F16;
#   2. llama.cpp (scripts/build_llama_cpp.sh) quantizes the F16 export to TQ2_0, its fastest
#      ternary type, twice: as llama-quantize does by default (the token embedding, which is
#      also the tied LM head, in Q6_K) and with a ternary embedding, the same bits as tern's file;
#   3. `tern bench decode --gguf --json` and llama-bench at each thread count, plus the
#      machine's read bandwidth (scripts/membw.c) for the decode bound;
#   4. with IK_LLAMA set (a source tree or git directory of the public ikawrakow/ik_llama.cpp,
#      built by scripts/build_ik_llama.sh), its IQ2_BN and IQ1_BN of the same F16 export too
#      (ternary embedding), with and without its run-time repacking to the row-interleaved _R4
#      layout (`-rtr 1`);
#   5. results.md (the CPU model and flags, a table with the ratios) and the raw JSON in OUT_DIR.
#   tern runs once per resident layout in SCALES (`tern --scales`: f32, the default, 2.25 bits per
#   weight; byte, ~2.09 bits at this shape): the peers' ratios are against the first, and a second
#   table sets every layout beside llama.cpp's TQ2_0 and the fastest ik_llama.cpp row. Each
#   layout runs once per input scheme in ACTS (`tern --act-quant`: none, int8 per 32, the file's;
#   per_token, one int8 step per token: the kernels of a model trained with act_quant =
#   "per_token"; on this random model it times them, accuracy is `tern eval --kl-base`'s job).
#   Every side reports the mean and standard deviation of REPS timed repetitions (llama-bench -r).
#   Prompt processing and decode run as separate llama-bench calls: a peer that crashes in one
#   (stock llama.cpp's AMX path dies with "Illegal instruction" on some AMX CPUs) leaves its
#   cell empty ("n/a") and the rest of the table stands.
# Usage: scripts/bench_packed.sh [OUT_DIR]
#   env: THREADS="1 2", PROMPT=64, GEN=32, REPS=5, ARCH=qwen3-0.6b|smollm2-135m, MODEL=checkpoint,
#        IK_LLAMA=path (optional), IK_TYPES="IQ2_BN IQ1_BN", SCALES="f32 byte",
#        ACTS="none per_token", ISA=native|avx2
#   ISA=avx2: every side as on a CPU without AVX-512 (AMD Zen 2/3, Intel client cores), on a CPU
#   that has more: tern under TERN_ISA=avx2, llama.cpp and ik_llama.cpp built for AVX2 + FMA only
#   (LLAMA_ISA=avx2 in their build scripts). A stand-in: the real CPU's clocks, ports and memory
#   differ, so its figures are labelled as such in results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-packed}
threads=${THREADS:-1 2}
prompt=${PROMPT:-64}
gen=${GEN:-32}
reps=${REPS:-5}
read -r -a scales <<< "${SCALES:-f32 byte}"
read -r -a acts <<< "${ACTS:-none per_token}"
isa=${ISA:-native}
case $isa in
  native) ;;
  avx2) export TERN_ISA=avx2 LLAMA_ISA=avx2 ;;
  *) echo "error: ISA=$isa: expected native or avx2" >&2; exit 1 ;;
esac
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
# The peers' files: llama.cpp's TQ2_0 as llama-quantize makes it by default (the token embedding,
# which is also the tied LM head, in Q6_K: ~127 MB more read per token at this shape) and with a
# ternary embedding (`--token-embedding-type`), the fair comparison with tern's all-ternary file.
quantize() { # BIN TYPE OUT [ARGS...]
  local qbin=$1 ty=$2 f=$3
  shift 3
  [[ -f $f ]] || "$qbin/llama-quantize" "$@" "$out/f16.gguf" "$f" "$ty" >&2
}
quantize "$bin" TQ2_0 "$out/tq2_0.gguf"
quantize "$bin" TQ2_0 "$out/tq2_0-te.gguf" --token-embedding-type tq2_0
ik_types=()
if [[ -n ${IK_LLAMA:-} ]]; then
  ik_bin=$(scripts/build_ik_llama.sh "$IK_LLAMA" | tail -n 1)
  read -r -a ik_types <<< "${IK_TYPES:-IQ2_BN IQ1_BN}"
  for ty in "${ik_types[@]}"; do
    quantize "$ik_bin" "$ty" "$out/ik-${ty,,}-te.gguf" --token-embedding-type "${ty,,}"
  done
fi
gcc -O3 -march=native -fopenmp scripts/membw.c -o "$out/membw"

# llama-bench LABEL BIN FORMAT ARGS...: one prompt test and one decode test, each its own
# process, as JSON lines tagged with LABEL; a crash is reported and leaves that figure out.
bench_peer() {
  local label=$1 bin=$2 fmt=$3
  shift 3
  for test in "-p $prompt -n 0" "-p 0 -n $gen"; do
    # shellcheck disable=SC2086
    if ! "$bin/llama-bench" "$@" $test -r "$reps" -o "$fmt" > "$out/peer.tmp" 2> "$out/peer.err"; then
      echo "warning: $label: llama-bench $* $test failed: $(tail -n 1 "$out/peer.err")" >&2
      continue
    fi
    python3 - "$out/peer.tmp" "$label" "$fmt" <<'PY'
import json, sys
path, label, fmt = sys.argv[1:4]
text = open(path).read()
runs = json.loads(text) if fmt == "json" else [json.loads(l) for l in text.splitlines() if l.strip()]
for r in runs:
    print(json.dumps({"label": label, "threads": r["n_threads"], "decode": r["n_gen"] > 0,
                      "tok_s": r["avg_ts"], "sd": r["stddev_ts"]}))
PY
  done
}

: > "$out/tern.jsonl"
: > "$out/peers.jsonl"
: > "$out/membw.txt"
for t in $threads; do
  echo "$t $("$out/membw" "$t")" >> "$out/membw.txt"
  # Separate processes: each load and RSS is its own.
  for ac in "${acts[@]}"; do
    for sc in "${scales[@]}"; do
      $tern --scales "$sc" --act-quant "$ac" bench decode --gguf "$out/q2_0.gguf" --prompt "$prompt" -n "$gen" -r "$reps" --threads "$t" --json >> "$out/tern.jsonl"
    done
  done
  bench_peer "llama.cpp TQ2_0 (Q6_K embedding)" "$bin" jsonl -m "$out/tq2_0.gguf" -t "$t" >> "$out/peers.jsonl"
  bench_peer "llama.cpp TQ2_0" "$bin" jsonl -m "$out/tq2_0-te.gguf" -t "$t" >> "$out/peers.jsonl"
  for ty in "${ik_types[@]}"; do
    for rtr in 0 1; do
      label="ik_llama.cpp $ty"
      [[ $rtr == 1 ]] && label+=" -rtr (${ty}_R4)"
      bench_peer "$label" "$ik_bin" json -m "$out/ik-${ty,,}-te.gguf" -t "$t" -rtr "$rtr" >> "$out/peers.jsonl"
    done
  done
done
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
cpu+=", CPUID family $(grep -m1 "cpu family" /proc/cpuinfo | cut -d: -f2 | tr -d ' ') model $(grep -m1 "^model[[:space:]]" /proc/cpuinfo | cut -d: -f2 | tr -d ' ')"
flags=$(grep -m1 "^flags" /proc/cpuinfo | tr ' ' '\n' | grep -E "^(avx2|avx512f|avx512_vnni|avx_vnni|avx512_bf16|amx_tile|amx_int8|amx_bf16|asimddp)$" | tr '\n' ' ' || true)
python3 - "$out" "$cpu" "$flags" "$(basename "$model")" "$isa" <<'PY'
import json, os, sys
out, cpu, flags, model, isa = sys.argv[1:6]
load = lambda name: [json.loads(l) for l in open(f"{out}/{name}") if l.strip()]
tern, peers = load("tern.jsonl"), load("peers.jsonl")
bw = {int(l.split()[0]): float(l.split()[1]) for l in open(f"{out}/membw.txt")}
q2_bytes = os.path.getsize(f"{out}/q2_0.gguf")
pm = lambda v, sd: "n/a" if v is None else f"{v:.1f} ± {sd:.1f}"
ratio = lambda a, b: "n/a" if a is None or b is None else f"{a / b:.2f}x"
labels = list(dict.fromkeys(p["label"] for p in peers))
threads = list(dict.fromkeys(t["threads"] for t in tern))
def peer(label, n, dec):
    return next(((p["tok_s"], p["sd"]) for p in peers
                 if p["label"] == label and p["threads"] == n and p["decode"] == dec), (None, 0.0))
def layout(t):  # tern's resident layout: bits per weight and scale store
    bits = t.get("resident_bits_per_weight")
    store = "+".join(dict.fromkeys(t.get("scales") or ["f32"]))
    act = t.get("act_quant", "none")
    inputs = "inputs int8 per 32" if act == "none" else f"inputs {act}"
    kv = f", kv {t['cache_type']}" if t.get("cache_type") else ""
    return (f"{bits:.2f} bits resident, scales {store}" if bits else "f32 scales") + f", {inputs}{kv}"
rows = ["| threads | engine (file) | prefill tok/s | decode tok/s | tern prefill / it | tern decode / it |",
        "|---:|---|---:|---:|---:|---:|"]
for n in threads:
    mine = [t for t in tern if t["threads"] == n]
    first = mine[0]
    tp, td = first["prefill_tok_s"], first["decode_tok_s"]
    for t in mine:
        rows.append(f"| {n} | **tern Q2_0** ({q2_bytes / 1e6:.1f} MB file; {layout(t)}; kernel {t['kernel']}) | "
                    f"{pm(t['prefill_tok_s'], t.get('prefill_tok_s_sd', 0.0))} | "
                    f"{pm(t['decode_tok_s'], t.get('decode_tok_s_sd', 0.0))} | | |")
    for label in labels:
        (pp, psd), (dd, dsd) = peer(label, n, False), peer(label, n, True)
        rows.append(f"| {n} | {label} | {pm(pp, psd)} | {pm(dd, dsd)} | {ratio(tp, pp)} | {ratio(td, dd)} |")
# Every tern layout beside llama.cpp's TQ2_0 (ternary embedding) and ik_llama's fastest decode,
# and against the read bound of its own resident bytes.
ik = [l for l in labels if l.startswith("ik_llama")]
lay = ["| threads | tern layout | prefill tok/s | decode tok/s | decode / TQ2_0 | decode / best ik_llama | prefill / TQ2_0 | read GB/s | decode / bound |",
       "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
for t in tern:
    n = t["threads"]
    tq_p, tq_d = peer("llama.cpp TQ2_0", n, False)[0], peer("llama.cpp TQ2_0", n, True)[0]
    best = max((peer(l, n, True)[0] or 0.0 for l in ik), default=0.0) or None
    b = bw.get(n)
    # Bytes a decoded token reads: the packed matrices as tern holds them (older builds: the file).
    resident = t.get("resident_weight_bytes") or q2_bytes
    bound = b * 1e9 / resident if b else None
    lay.append(f"| {n} | {layout(t)} | {t['prefill_tok_s']:.1f} | {t['decode_tok_s']:.1f} | "
               f"{ratio(t['decode_tok_s'], tq_d)} | {ratio(t['decode_tok_s'], best)} | "
               f"{ratio(t['prefill_tok_s'], tq_p)} | {b or 0:.1f} | "
               + ("n/a" if bound is None else f"{t['decode_tok_s'] / bound:.0%} of {bound:.0f}") + " |")
if isa == "avx2":
    flags += "; RUN AS AN AVX2-ONLY CPU: tern with TERN_ISA=avx2, the peers built for AVX2 + FMA only"
table = (f"CPU: {cpu} ({os.cpu_count()} cores; {flags.strip()}); model: {model}\n\n"
         + "\n".join(rows) + "\n\n" + "\n".join(lay))
print(table)
open(f"{out}/results.md", "w").write(table + "\n")
PY
