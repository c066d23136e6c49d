#!/usr/bin/env python3
"""How much int8 activation quantization costs a pretrained model, by group size.

tern's packed kernels quantize every Linear's input to int8 with one step per 32 values (as
llama.cpp's Q8_0); bitnet.cpp's and ik_llama.cpp's ternary kernels use one step per row (per
token), which lets their integer dot products run a whole row without float work (NOTES.md,
issue 22, session 22). This probe measures the accuracy side of that trade on real weights,
without tern: the model in full precision (transformers, dequantized from the GGUF), every
nn.Linear's input (the LM head included) fake-quantized to int8 absmax per GROUP values, against
the same model without quantization: mean KL(base || quantized), the share of positions with the
same top token, and perplexity, over non-overlapping windows of a text.

  build/pytorch/venv/bin/python scripts/act_quant_probe.py \
      --gguf data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --data data/english.txt \
      [--ctx 257] [--max-bytes 60000] [--groups 32,128,row]

(scripts/setup_pytorch.sh makes the venv, with PyPI's gguf and accelerate, which transformers
needs to read a GGUF.)
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F


def fake_quant(x, group):
    """int8 absmax quantization of the last dimension, one step per `group` values (None: per
    row), returned dequantized. Zero-padded to whole groups, as tern pads to super-blocks."""
    n = x.shape[-1]
    g = n if group is None else group
    pad = (-n) % g
    xp = F.pad(x, (0, pad)) if pad else x
    v = xp.reshape(*xp.shape[:-1], -1, g)
    step = v.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.clamp(torch.round(v / safe), -127, 127) * step
    return q.reshape(xp.shape)[..., :n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ctx", type=int, default=257)
    ap.add_argument("--max-bytes", type=int, default=60000)
    ap.add_argument("--groups", default="32,128,row")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    for flag, path in (("--gguf", a.gguf), ("--data", a.data)):
        if not os.path.isfile(path):
            sys.exit(f"error: {flag} {path}: no such file")
    for spec in a.groups.split(","):
        if spec != "row" and not (spec.isdigit() and int(spec) > 0):
            sys.exit(f"error: --groups: {spec!r}: expected a positive group size or 'row'")
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    model.eval()
    text = open(a.data, encoding="utf-8", errors="replace").read()[: a.max_bytes]
    ids = tok(text, return_tensors="pt").input_ids[0]
    windows = [ids[i : i + a.ctx] for i in range(0, len(ids) - a.ctx + 1, a.ctx)]
    if not windows:
        sys.exit(f"error: {a.data}: {len(ids)} tokens, fewer than one window of --ctx {a.ctx}")

    group = {"g": None, "on": False}

    def pre_hook(_module, args):
        if not group["on"]:
            return None
        return (fake_quant(args[0], group["g"]),) + tuple(args[1:])

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for m in linears:
        m.register_forward_pre_hook(pre_hook)

    def logits_of(w):
        with torch.no_grad():
            return model(w.unsqueeze(0)).logits[0].float()

    base = [logits_of(w) for w in windows]
    rows = []
    for spec in ["none"] + a.groups.split(","):
        group["on"] = spec != "none"
        group["g"] = None if spec in ("none", "row") else int(spec)
        kl_sum = same = nll = count = 0.0
        kl_max = 0.0
        for w, b in zip(windows, base):
            lq = logits_of(w) if group["on"] else b
            lp_b, lp_q = F.log_softmax(b, -1), F.log_softmax(lq, -1)
            kl = (lp_b.exp() * (lp_b - lp_q)).sum(-1)
            kl_sum += kl.sum().item()
            kl_max = max(kl_max, kl.max().item())
            same += (b.argmax(-1) == lq.argmax(-1)).sum().item()
            nll += -lp_q[:-1].gather(-1, w[1:].unsqueeze(-1)).sum().item()
            count += len(w)
        scored = count - len(windows)
        row = {"activations": "f32" if spec == "none" else f"int8 per {spec}",
               "mean_kl": kl_sum / count, "max_kl": kl_max, "same_top": same / count,
               "ppl": math.exp(nll / scored), "positions": int(count)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{a.gguf}, {a.data} (first {a.max_bytes} bytes), {len(windows)} windows of {a.ctx}; "
          f"{len(linears)} Linear inputs quantized\n")
    print("| activations | mean KL | max KL | same top token | perplexity |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['activations']} | {r['mean_kl']:.3g} | {r['max_kl']:.3g} | "
              f"{100 * r['same_top']:.2f}% | {r['ppl']:.4f} |")


if __name__ == "__main__":
    main()
