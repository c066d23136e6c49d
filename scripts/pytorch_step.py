#!/usr/bin/env python3
"""PyTorch eager baseline for `tern bench step`: the same ternary training step on the same CPU.

transformers' Qwen3ForCausalLM (scratch init, f32), every Linear, the embedding and the tied LM head
computing with the group-128 mean(|W|) ternary projection through a straight-through estimator
(w + (q - w).detach()), the full-logits cross-entropy transformers computes from `labels`,
global-norm clipping at 1.0 and torch.optim.AdamW (betas 0.9/0.95, wd 0.1). Same token ids as
`tern bench step` (i * 2654435761 + seed mod vocab). Prints one line per step and a JSON summary.

    py=$(scripts/setup_pytorch.sh)   # a venv with PyPI's torch and transformers
    $py scripts/pytorch_step.py --arch configs/tiny.toml --batch 8 --seq 128 --steps 6
    $py scripts/pytorch_step.py --arch qwen3-0.6b --batch 1 --seq 512 --steps 2
    $py scripts/pytorch_step.py --arch smollm2-135m --batch 4 --seq 256 --dtype bf16
    python3 scripts/pytorch_step.py --device cuda --dtype bf16 --arch qwen3-0.6b --batch 8 --seq 512

On a GPU: --dtype bf16 runs the step under torch.autocast (bf16 GEMMs, f32 master weights and
AdamW state), timed with CUDA synchronization; peak GPU memory is torch.cuda.max_memory_allocated.
Without transformers installed (the GPU machines have PyTorch only) the same Qwen3 is built from
plain torch modules below (--impl plain). `smollm2-135m` (SmolLM2-135M's shape, Llama: no q/k
norms) is transformers' LlamaForCausalLM, as tern's `--arch smollm2-135m`.
"""
import argparse
import json
import resource
import time
import tomllib

import torch
import torch.nn.functional as F

try:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
except ImportError:  # the GPU machines: PyTorch only
    LlamaConfig = LlamaForCausalLM = Qwen3Config = Qwen3ForCausalLM = None


class Cfg(dict):
    __getattr__ = dict.__getitem__


class Rms(torch.nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(n)), eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class Block(torch.nn.Module):
    """One Qwen3 decoder layer (q/k RMSNorm, RoPE, GQA, SwiGLU), as transformers computes it."""

    def __init__(self, c):
        super().__init__()
        h, hd, nh, nkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = lin(h, nh * hd), lin(h, nkv * hd), lin(h, nkv * hd), lin(nh * hd, h)
        self.gate_proj, self.up_proj, self.down_proj = lin(h, c.intermediate_size), lin(h, c.intermediate_size), lin(c.intermediate_size, h)
        self.input_layernorm, self.post_attention_layernorm = Rms(h, c.rms_norm_eps), Rms(h, c.rms_norm_eps)
        self.q_norm, self.k_norm = Rms(hd, c.rms_norm_eps), Rms(hd, c.rms_norm_eps)
        self.nh, self.nkv, self.hd = nh, nkv, hd

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_norm(self.q_proj(h).view(b, t, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(h).view(b, t, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.nkv, self.hd).transpose(1, 2)
        rot = lambda z: torch.cat((-z[..., self.hd // 2:], z[..., : self.hd // 2]), -1)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # under autocast q and k are bf16
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class PlainQwen3(torch.nn.Module):
    """Qwen3ForCausalLM's computation with a tied head, from plain torch modules."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = torch.nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = torch.nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = Rms(c.hidden_size, c.rms_norm_eps)
        for m in self.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)

    def forward(self, input_ids):
        t, hd = input_ids.shape[1], self.c.head_dim
        inv = 1.0 / (self.c.rope_theta ** (torch.arange(0, hd, 2, device=input_ids.device).float() / hd))
        ang = torch.outer(torch.arange(t, device=input_ids.device).float(), inv)
        ang = torch.cat((ang, ang), -1)
        x = self.embed_tokens(input_ids)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return Cfg(logits=F.linear(x, project_ste(self.embed_tokens.weight, 128, "mean_abs")))


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
    elif arch == "smollm2-135m":  # tern's ModelConfig::smollm2_135m
        base.update(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                    rope_theta=1e5, max_position_embeddings=8192, llama=True)
    elif arch != "qwen3-0.6b":
        raise SystemExit(f"--arch: expected qwen3-0.6b, smollm2-135m or a tern .toml config, found {arch}")
    return base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="configs/tiny.toml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation: sdpa or eager")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="bf16: autocast mixed precision")
    ap.add_argument("--impl", default="auto", choices=["auto", "transformers", "plain"],
                    help="transformers' Qwen3ForCausalLM, or the plain-torch copy above (auto: transformers if installed)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    base = arch_config(a.arch)
    llama = base.pop("llama", False)
    impl = a.impl if a.impl != "auto" else ("transformers" if Qwen3ForCausalLM else "plain")
    if llama:
        if impl != "transformers":
            raise SystemExit("--arch smollm2-135m needs transformers (LlamaForCausalLM)")
        cfg = LlamaConfig(**base, hidden_act="silu", attention_bias=False, mlp_bias=False)
        cfg._attn_implementation = a.attn
        model = LlamaForCausalLM(cfg)
    elif impl == "transformers":
        cfg = Qwen3Config(**base)
        cfg._attn_implementation = a.attn
        model = Qwen3ForCausalLM(cfg)
    else:
        cfg = Cfg(base)
        model = PlainQwen3(cfg)
    dev = torch.device(a.device)
    model = model.float().to(dev).train()
    make_ternary(model, 128, "mean_abs")
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    n = a.batch * (a.seq + 1)
    ids = torch.tensor([(i * 2654435761 + a.seed) % cfg.vocab_size for i in range(n)]).view(a.batch, a.seq + 1).to(dev)
    inp, tgt = ids[:, :-1], ids[:, 1:]
    times = []
    for step in range(a.steps):
        sync()
        t0 = time.perf_counter()
        with autocast:
            logits = model(input_ids=inp).logits
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), tgt.reshape(-1))
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        if step == 0:
            first_loss = loss.item()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"step {step}: loss {loss.item():.4f}, {dt:.2f}s, {a.batch * a.seq / dt:.0f} tokens/s, peak rss {rss:.2f} GiB")
    # The median step time after the warm-up (the mean of the middle two for an even count), as
    # `tern bench step` computes it, so the two rates come from one statistic.
    steady = sorted(times[1:] or times)
    mid = len(steady) // 2
    median_s = steady[mid] if len(steady) % 2 else (steady[mid - 1] + steady[mid]) / 2
    print(json.dumps({"torch": torch.__version__, "threads": a.threads, "arch": a.arch, "batch": a.batch, "seq": a.seq,
                      "impl": impl, "device": a.device, "dtype": a.dtype,
                      "gpu": torch.cuda.get_device_name() if cuda else None,
                      "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                      "loss_first": first_loss, "loss_last": loss.item(),
                      "attn": a.attn, "median_step_s": median_s,
                      "tokens_per_s": a.batch * a.seq / median_s,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


if __name__ == "__main__":
    main()
