#!/usr/bin/env python3
"""PyTorch eager baseline for `tern bench step`: the same ternary training step on the same CPU.

transformers' Qwen3ForCausalLM (scratch init, f32), every Linear, the embedding and the tied LM head
computing with the group-128 mean(|W|) ternary projection through a straight-through estimator
(w + (q - w).detach()), the full-logits cross-entropy transformers computes from `labels`,
global-norm clipping at 1.0 and torch.optim.AdamW (betas 0.9/0.95, wd 0.1). Same token ids as
`tern bench step` (i * 2654435761 + seed mod vocab). Prints one line per step and a JSON summary.

    /opt/pyref/bin/python scripts/pytorch_step.py --arch configs/tiny.toml --batch 8 --seq 128 --steps 6
    /opt/pyref/bin/python scripts/pytorch_step.py --arch qwen3-0.6b --batch 1 --seq 512 --steps 2
"""
import argparse
import json
import resource
import time
import tomllib

import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM


def project_ste(w, group, rule):
    """w + (t*s - w).detach(): value ternary, gradient identity (groups along rows)."""
    rows, cols = w.shape
    parts = []
    full = cols // group * group
    for lo, hi, g in ((0, full, group), (full, cols, cols - full)):
        if hi <= lo:
            continue
        x = w[:, lo:hi].reshape(rows, (hi - lo) // g, g)
        s = x.abs().mean(-1, keepdim=True) if rule == "mean_abs" else x.abs().amax(-1, keepdim=True)
        t = (x / s.clamp_min(1e-30)).round().clamp(-1, 1)
        parts.append((t * s).reshape(rows, hi - lo))
    q = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    return w + (q - w).detach()


def make_ternary(model, group, rule):
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.forward = (lambda mod: lambda x: F.linear(x, project_ste(mod.weight, group, rule), mod.bias))(m)
        elif isinstance(m, torch.nn.Embedding):
            m.forward = (lambda mod: lambda ids: F.embedding(ids, project_ste(mod.weight, group, rule)))(m)


def arch_config(arch):
    base = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=True)
    if arch.endswith(".toml"):
        with open(arch, "rb") as f:
            m = tomllib.load(f)["model"]
        keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                "tie_word_embeddings"]
        base.update({k: m[k] for k in keys if k in m})
    elif arch != "qwen3-0.6b":
        raise SystemExit(f"--arch: expected qwen3-0.6b or a tern .toml config, found {arch}")
    return Qwen3Config(**base)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="configs/tiny.toml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation: sdpa or eager")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = arch_config(a.arch)
    cfg._attn_implementation = a.attn
    model = Qwen3ForCausalLM(cfg).float().train()
    make_ternary(model, 128, "mean_abs")
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    n = a.batch * (a.seq + 1)
    ids = torch.tensor([(i * 2654435761 + a.seed) % cfg.vocab_size for i in range(n)]).view(a.batch, a.seq + 1)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    times = []
    for step in range(a.steps):
        t0 = time.perf_counter()
        logits = model(input_ids=inp).logits
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tgt.reshape(-1))
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        times.append(dt)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"step {step}: loss {loss.item():.4f}, {dt:.2f}s, {a.batch * a.seq / dt:.0f} tokens/s, peak rss {rss:.2f} GiB")
    steady = times[1:] or times
    print(json.dumps({"torch": torch.__version__, "threads": a.threads, "arch": a.arch, "batch": a.batch, "seq": a.seq,
                      "attn": a.attn, "median_step_s": sorted(steady)[len(steady) // 2],
                      "tokens_per_s": a.batch * a.seq / sorted(steady)[len(steady) // 2],
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


if __name__ == "__main__":
    main()
