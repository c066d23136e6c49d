#!/usr/bin/env bash
# PyTorch and transformers from PyPI, the peer scripts/bench_train.sh and scripts/pytorch_step.py
# measure tern's training step beside (with gguf and accelerate, for transformers to read a GGUF
# in scripts/act_quant_probe.py): in a venv under build/pytorch (PyPI's Linux wheel of torch
# carries CUDA libraries, ~3 GB installed, and runs on the CPU without a GPU). Idempotent; prints
# the python to use. Pinned versions (TORCH=, TRANSFORMERS= override them).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build/pytorch
py=$PWD/$dir/venv/bin/python
torch_v=${TORCH:-2.15.0}
transformers_v=${TRANSFORMERS:-4.57.6}
# What transformers needs to load a GGUF (scripts/act_quant_probe.py).
gguf_v=0.19.0
accelerate_v=1.16.0
if ! "$py" -c "import torch, transformers" 2>/dev/null; then
  rm -rf "$dir"
  mkdir -p "$dir"
  python3 -m venv "$dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check \
    "torch==$torch_v" "transformers==$transformers_v" "gguf==$gguf_v" "accelerate==$accelerate_v" >&2
elif ! "$py" -c "import gguf, accelerate" 2>/dev/null; then
  # A venv from before they were needed: add them, keep the 3 GB of torch.
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check \
    "gguf==$gguf_v" "accelerate==$accelerate_v" >&2
fi
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >&2
echo "$py"
