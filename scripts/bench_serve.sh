#!/usr/bin/env bash
# Serving under load, tern serve beside llama-server on the same model, loopback only:
#   1. a random checkpoint at the Qwen3-0.6B shape (`tern bench make-model`), exported by tern as
#      Q2_0 (what tern serves, packed) and F16; llama.cpp quantizes the F16 to TQ2_0 with a ternary
#      token embedding (the same bits as tern's file; as scripts/bench_packed.sh does);
#   2. each server started with THREADS threads and CLIENTS parallel slots, then
#      scripts/serve_load.py (the official OpenAI client, AsyncOpenAI, streaming /v1/completions):
#      one client alone, then CLIENTS at once, REQUESTS requests each of ~PROMPT_WORDS words and
#      GEN new tokens (temperature TEMP, default 0 = greedy; above 0 each server's default
#      top-k 40 / top-p 0.95 / min-p 0.05 sampling; ignore_eos): aggregate completion tokens/s, time to first
#      token p50/p99;
#   3. with SOAK=seconds, tern alone under SOAK_CLIENTS clients with 10% malformed requests and
#      10% streams dropped after their first chunk, its RSS sampled each second, and /health's
#      KV block count read after the load has drained (0 = nothing leaked);
#   4. results.md (the CPU named) and the raw JSON lines in OUT_DIR.
# Usage: scripts/bench_serve.sh [OUT_DIR]
#   env: THREADS=2 CLIENTS=8 REQUESTS=4 PROMPT_WORDS=64 GEN=64 SOAK=0 SOAK_CLIENTS=16
#        SKIP_LLAMA=1 (tern only) TEMP=0 TERN=path (a tern binary to measure instead of this
#        checkout's release build, e.g. an older build for an A/B pair), TERN_ARGS="..." (more
#        `tern serve` flags, e.g. --prefill-chunk 512), TERN_ACT_QUANT=per_token (tern's kernels
#        for a model trained with per-token inputs; the random model is not, so this times them)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/bench-serve}
threads=${THREADS:-2}
clients=${CLIENTS:-8}
requests=${REQUESTS:-4}
words=${PROMPT_WORDS:-64}
gen=${GEN:-64}
temp=${TEMP:-0}
soak=${SOAK:-0}
mkdir -p "$out"
if [[ -n ${TERN:-} ]]; then
  tern=$TERN
else
  cargo build --release >&2
  tern=./target/release/tern
fi
py=$(scripts/setup_openai_client.sh)
[[ -s data/tokenizer.json ]] || scripts/fetch_assets.sh >&2
model=$out/qwen3-0.6b-random
[[ -f $model/model.safetensors ]] || $tern bench make-model --arch qwen3-0.6b --out "$model" --tokenizer data/tokenizer.json >&2
[[ -f $out/q2_0.gguf ]] || $tern export --model "$model" --out "$out/q2_0.gguf" >&2
if [[ -z ${SKIP_LLAMA:-} ]]; then
  [[ -f $out/f16.gguf ]] || $tern export --model "$model" --out "$out/f16.gguf" --format f16 >&2
  qbin=$(scripts/build_llama_cpp.sh | tail -n 1)
  [[ -f $out/tq2_0-te.gguf ]] || "$qbin/llama-quantize" --token-embedding-type tq2_0 "$out/f16.gguf" "$out/tq2_0-te.gguf" TQ2_0 >&2
  sbin=$(scripts/build_llama_server.sh | tail -n 1)
fi
port=$((20000 + RANDOM % 20000))
base=http://127.0.0.1:$port/v1

wait_up() { # PID
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    kill -0 "$1" 2>/dev/null || { echo "error: the server exited (see $out/*.log)" >&2; return 1; }
    sleep 0.5
  done
  echo "error: the server did not come up" >&2; return 1
}

# tern's /health: wait until no request is active or queued (cancelled streams are noticed at
# their next token), then print it.
drained_health() {
  for _ in $(seq 100); do
    h=$(curl -s "http://127.0.0.1:$port/health")
    python3 -c "import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d.get('active',0)+d.get('queued',0)==0 else 1)" "$h" && break
    sleep 0.2
  done
  echo "$h"
}

load() { # NAME CLIENTS [ARGS...]
  local name=$1 n=$2
  shift 2
  "$py" scripts/serve_load.py --base "$base" --clients "$n" --requests "$requests" \
    --prompt-words "$words" --max-tokens "$gen" --temperature "$temp" "$@" | tee -a "$out/load.jsonl" | \
    python3 -c "import json,sys; d=json.load(sys.stdin); d['server']=sys.argv[1]; print(json.dumps(d))" "$name" >> "$out/runs.jsonl"
}

: > "$out/runs.jsonl"
: > "$out/load.jsonl"
ctx=$((words * 2 + gen + 64))
echo "== tern serve" >&2
# shellcheck disable=SC2086
$tern --threads "$threads" serve --model "$out/q2_0.gguf" --port "$port" --parallel "$clients" \
  --ctx "$ctx" ${TERN_ARGS:-} > "$out/tern.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
wait_up $pid
load tern 1
load tern "$clients"
drained_health > "$out/tern-health.json"
kill -INT $pid; wait $pid || true

if [[ -z ${SKIP_LLAMA:-} ]]; then
  echo "== llama-server" >&2
  "$sbin/llama-server" -m "$out/tq2_0-te.gguf" -t "$threads" -np "$clients" -c $((ctx * clients)) \
    --port "$port" --no-webui > "$out/llama-server.log" 2>&1 &
  pid=$!
  wait_up $pid
  load llama-server 1
  load llama-server "$clients"
  kill $pid; wait $pid || true
fi

if [[ $soak -gt 0 ]]; then
  echo "== soak: tern serve, ${SOAK_CLIENTS:-16} clients, $soak s" >&2
  # shellcheck disable=SC2086
  $tern --threads "$threads" serve --model "$out/q2_0.gguf" --port "$port" --parallel "$clients" \
    --ctx "$ctx" ${TERN_ARGS:-} > "$out/soak.log" 2>&1 &
  pid=$!
  wait_up $pid
  load soak "${SOAK_CLIENTS:-16}" --duration "$soak" --malformed 0.1 --disconnect 0.1 --pid $pid
  drained_health > "$out/soak-health.json"
  kill -0 $pid && echo "soak: server alive" >&2
  kill -INT $pid; wait $pid || true
fi

python3 - "$out" "$threads" "$temp" <<'PY'
import json, os, platform, sys
out, threads, temp = sys.argv[1], sys.argv[2], float(sys.argv[3])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model\t")), "?")
runs = [json.loads(l) for l in open(os.path.join(out, "runs.jsonl"))]
alone = {r["server"]: r["completion_tok_per_s"] for r in runs if r["clients"] == 1}
lines = [f"CPU: {cpu} (CPUID model {model}), {threads} threads; Qwen3-0.6B shape, random weights, "
         "tern Q2_0 (packed) vs llama.cpp TQ2_0 (ternary embedding); "
         + ("greedy" if temp <= 0 else f"temperature {temp:g}, top-k 40, top-p 0.95, min-p 0.05"), "",
         "| server | clients | requests ok | completion tok/s | vs 1 client | TTFT p50 s | TTFT p99 s | errors |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
for r in runs:
    f = lambda x: "n/a" if x is None else f"{x:.3f}"
    # The soak row has no one-client run of its own ("soak" is not a server name): left blank.
    rel = (f"{r['completion_tok_per_s'] / alone[r['server']]:.2f}x"
           if alone.get(r["server"]) else "")
    lines.append(f"| {r['server']} | {r['clients']} | {r['ok']} | {r['completion_tok_per_s']:.1f} | {rel} | "
                 f"{f(r['ttft_p50_s'])} | {f(r['ttft_p99_s'])} | {r['error_count']} |")
batched = {r["server"]: r["completion_tok_per_s"] for r in runs if r["clients"] > 1 and r["server"] != "soak"}
if "tern" in batched and "llama-server" in batched:
    lines.append(f"\ntern / llama-server at {max(r['clients'] for r in runs if r['server'] == 'tern')} clients: "
                 f"{batched['tern'] / batched['llama-server']:.2f}x")
for name in ("tern-health.json", "soak-health.json"):
    p = os.path.join(out, name)
    if os.path.isfile(p):
        lines.append(f"\n{name}: {open(p).read().strip()}")
soak = [r for r in runs if r["server"] == "soak"]
if soak:
    s = soak[0]
    lines.append(f"\nsoak: {s['wall_s']} s, {s['ok']} streams ok, {s['malformed']} malformed ({s['malformed_ok']} got 400), "
                 f"{s['disconnected']} dropped, {s['error_count']} errors; RSS KiB after warm-up {s.get('rss_kib_start')} -> end "
                 f"{s.get('rss_kib_end')} (max {s.get('rss_kib_max')})")
open(os.path.join(out, "results.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
