#!/usr/bin/env bash
# The GPU check (issue 14), ONE command on the GPU machine, at most ~8 minutes:
#   scripts/gpu_check.sh RESULTS_DIR
# Needs build/gpu/ from scripts/prepare_gpu_check.sh (made on a build machine) and the GPU
# machine's PyTorch (whose CUDA 13 wheels provide cuBLAS / cuRAND / NVRTC at run time).
# Runs: tern info; the CUDA-vs-CPU tests; `tern bench step` at the 0.6B shape, batch 8 x seq 512,
# f32 and bf16; the PyTorch peer on the same GPU; 30 steps of the real job's config on a random
# 0.6B-shaped checkpoint made here; generate and export of the result. Peak GPU memory of each
# benchmark is sampled with nvidia-smi. Everything lands in RESULTS_DIR: summary.json + log.txt and
# ~18 more files; the device tool brings back 8 files, so pass a folder outside $OUT and tar it:
#   scripts/gpu_check.sh /tmp/gc; tar czf $OUT/gc.tgz -C /tmp gc
# GPU_CHECK_BUDGET_S (default 420) caps the whole run: each step's timeout is the smaller of its
# own and what is left, so a hung step cannot eat the device call's limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu_check.sh RESULTS_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
B=$(pwd)/build/gpu
W=${TMPDIR:-/tmp}/tern-gpu-check
rm -rf "$W" && mkdir -p "$W"
exec > >(tee "$OUT/log.txt") 2>&1
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
BUDGET=${GPU_CHECK_BUDGET_S:-420}
# lim N: the timeout for the next step, N seconds or what is left of the budget (at least 5).
lim() { local left=$(( BUDGET - ($(date +%s) - T0) )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }

# CUDA 13 libraries from PyTorch's nvidia wheels (libcuda itself is the driver's, on the system).
LIBS=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for pat in ("nvidia/*/lib", "nvidia/cu13/lib", "torch/lib"):
        for d in glob.glob(os.path.join(sp, pat)):
            if glob.glob(os.path.join(d, "*.so*")):
                dirs.add(d)
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# candle ships its kernels as PTX, which the driver compiles at a module's first use (13 s and more
# per process on a fresh machine, session 14); let its cache keep every module between commands.
export CUDA_CACHE_MAXSIZE=4294967296
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
gunzip -c "$B/tokenizer.json.gz" > "$W/tokenizer.json"
gunzip -c "$B/train_data.txt.gz" > "$W/train_data.txt"
gunzip -c "$B/tern.gz" > "$W/tern" && chmod +x "$W/tern"
gunzip -c "$B/devices-test.gz" > "$W/devices-test" && chmod +x "$W/devices-test"
TERN="$W/tern"

# Peak GPU memory of a command: nvidia-smi sampled every 100 ms (MiB, the whole GPU).
peak_mem() {  # peak_mem NAME cmd...
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$W/$name.mem" 2>/dev/null &
  local smi=$!
  "$@"; local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  sort -n "$W/$name.mem" | tail -1 > "$OUT/$name.peak_mib"
  return $rc
}

say "tern info"
timeout $(lim 60) "$TERN" info --json | tee "$OUT/info.json"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

say "CUDA vs CPU tests"
timeout $(lim 150) "$W/devices-test" --test-threads 1 2>&1 | tee "$OUT/cuda_tests.txt"
echo "${PIPESTATUS[0]}" > "$OUT/cuda_tests.rc"

for dt in f32 bf16; do
  say "tern bench step 0.6B batch 8 x seq 512, $dt"
  peak_mem "tern_step_$dt" timeout $(lim 100) "$TERN" bench step --arch qwen3-0.6b --device cuda --batch 8 --seq 512 \
    --steps 4 --dtype "$dt" --json | tee "$OUT/tern_step_$dt.txt"
done

# The PyTorch peer: transformers' model where it imports, else the plain-torch copy of it.
torch_step() {  # torch_step ARCH
  timeout "$(lim 100)" python3 scripts/pytorch_step.py --device cuda --dtype bf16 --arch "$1" \
    --batch 8 --seq 512 --steps 4 ||
    { [ "$1" = qwen3-0.6b ] && timeout "$(lim 100)" python3 scripts/pytorch_step.py --impl plain \
        --device cuda --dtype bf16 --arch "$1" --batch 8 --seq 512 --steps 4; }
}
say "PyTorch peer, bf16 autocast"
peak_mem torch_step_bf16 torch_step qwen3-0.6b | tee "$OUT/torch_step_bf16.txt"

say "30 steps of configs/qwen3-0.6b.toml (bf16) on a random 0.6B-shaped checkpoint"
timeout $(lim 60) "$TERN" bench make-model --arch qwen3-0.6b --out "$W/qwen3-rand" --tokenizer "$W/tokenizer.json"
# In the background, so that a run that sits leaves a stack sample of every thread behind (session
# 14's run sat after its first evaluation: the loss plot's endless loop on a machine without fonts,
# fixed since); the phase marks come from RUST_LOG's debug level for the trainer.
RUST_LOG=info,tern::train=debug timeout $(lim 150) "$TERN" train --config configs/qwen3-0.6b.toml --quiet \
  --set model.source="\"$W/qwen3-rand\"" --set data.train_file="\"$W/train_data.txt\"" \
  --set data.tokenizer="\"$W/tokenizer.json\"" --set train.device='"cuda"' --set train.dtype='"bf16"' \
  --set train.steps=30 --set train.warmup_steps=5 --set train.ste_ramp_steps=10 --set eval.every=10 \
  --set eval.batches=4 --set checkpoint.every=0 --set train.out_dir="\"$W/run\"" &
TRAIN=$!
for wait_s in 45 30; do
  for _ in $(seq "$wait_s"); do kill -0 $TRAIN 2>/dev/null && sleep 1; done
  kill -0 $TRAIN 2>/dev/null || break
  say "train still running: stack sample of every thread (cuda-gdb)"
  timeout 40 cuda-gdb -p "$(pgrep -n -x tern)" -batch -ex "thread apply all bt 60" >> "$OUT/train_stacks.txt" 2>&1
  grep -E "tern::|candle_core::|cuModuleLoad|cuStream|cuMem" "$OUT/train_stacks.txt" | tail -25
done
wait $TRAIN; echo "train exit status $?"
cp "$W/run/summary.json" "$OUT/train_summary.json" 2>/dev/null
cp "$W/run/metrics.jsonl" "$OUT/train_metrics.jsonl" 2>/dev/null
CK=$(ls -d "$W"/run/checkpoints/step-* 2>/dev/null | tail -1)

say "generate and export"
timeout $(lim 60) "$TERN" generate --model "$CK" --device cuda -n 128 -p "A compiler is" | tee "$OUT/generate.txt"
timeout $(lim 60) "$TERN" export --model "$CK" --out "$W/model.gguf" | tee "$OUT/export.txt"
ls -la "$W/model.gguf" >> "$OUT/export.txt" 2>&1

say "SmolLM2-135M's shape (the real pretrained model's), bf16, batch 8 x seq 512: tern, then PyTorch"
timeout "$(lim 60)" "$TERN" bench step --arch smollm2-135m --device cuda --batch 8 --seq 512 --steps 4 \
  --dtype bf16 --json | tee "$OUT/tern_step_smollm2_bf16.txt"
torch_step smollm2-135m | tee "$OUT/torch_step_smollm2_bf16.txt"

say "summary"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def last_json(name):
    try:
        lines = [l for l in open(os.path.join(out, name)) if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
def text(name):
    try:
        return open(os.path.join(out, name)).read().strip()
    except OSError:
        return None
def num(name):
    t = text(name)
    return float(t) if t else None
s = {
    "info": last_json("info.json"),
    "gpu": text("gpu.txt"),
    "cuda_tests_rc": num("cuda_tests.rc"),
    "cuda_tests_tail": (text("cuda_tests.txt") or "").splitlines()[-3:],
    "tern_step_f32": last_json("tern_step_f32.txt"),
    "tern_step_bf16": last_json("tern_step_bf16.txt"),
    "torch_step_bf16": last_json("torch_step_bf16.txt"),
    "tern_step_smollm2_bf16": last_json("tern_step_smollm2_bf16.txt"),
    "torch_step_smollm2_bf16": last_json("torch_step_smollm2_bf16.txt"),
    "peak_gpu_mib": {k: num(k + ".peak_mib") for k in ("tern_step_f32", "tern_step_bf16", "torch_step_bf16")},
    "train": json.loads(text("train_summary.json") or "null"),
    "generate": text("generate.txt"),
    "export": text("export.txt"),
}
for shape, t, p in (("qwen3-0.6b", "tern_step_bf16", "torch_step_bf16"),
                    ("smollm2-135m", "tern_step_smollm2_bf16", "torch_step_smollm2_bf16")):
    t, p = s[t], s[p]
    if t and p and t.get("tokens_per_s") and p.get("tokens_per_s"):
        s.setdefault("bf16_speed_ratio_tern_over_torch", {})[shape] = t["tokens_per_s"] / p["tokens_per_s"]
json.dump(s, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps({k: s[k] for k in ("cuda_tests_rc", "peak_gpu_mib")}, indent=1))
print("bf16 tern/torch tokens/s:", s.get("bf16_speed_ratio_tern_over_torch"))
PY
say "done: $OUT/summary.json"
