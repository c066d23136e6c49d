#!/usr/bin/env python3
"""Independent reference for tern's Qwen3: tiny random Qwen3 checkpoints written by Hugging Face
transformers (HF layout, exactly what the hub serves) plus the logits transformers computes for a
fixed batch of token ids, in full precision and after ternarizing the weights with tern's rule
(implemented here, separately, in torch).

Usage:  python3 scripts/make_fixtures.py tests/fixtures/qwen3
Needs:  pip install torch transformers safetensors   (only to regenerate; the outputs are committed)

Ternary rule (group-wise along each row's contiguous input dim, last partial group on its own):
    s = mean(|w|) (or max(|w|)) ;  t = clamp(round(w / s), -1, 1) ;  w_q = t * f16(s)
where f16(s) is the scale the GGUF stores and tern multiplies by: s computed in float32 as tern
computes it (|w| summed in row order, then divided), rounded to half precision.
Applied to the embedding, every q/k/v/o/gate/up/down projection and the untied LM head; RMSNorm
weights stay as they are.

Random weights are nudged away from the rounding boundary |w/s| = 0.5 (by at least MARGIN in
units of s) so that float32 summation order in s can never flip a code between torch and tern.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

GROUP = 128
MARGIN = 2e-4
SEQ = 16

FIXTURES = [
    # one tied, GQA 2:1, rows that are whole 128-groups
    dict(name="tied_gqa2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=384,
         tie_word_embeddings=True, rope_theta=10000.0, dtype=torch.float32, shard=None),
    # untied, GQA 3:1, o_proj/down_proj rows with partial groups, stored bf16 (loaded as f32)
    dict(name="untied_gqa3_bf16", hidden_size=128, intermediate_size=320, num_hidden_layers=2,
         num_attention_heads=6, num_key_value_heads=2, head_dim=32, vocab_size=320,
         tie_word_embeddings=False, rope_theta=1000000.0, dtype=torch.bfloat16, shard=None),
    # hidden 96 (not a multiple of 128: every row is one partial group), GQA 3:1, head_dim not
    # hidden/heads, stored f16 in several shards with model.safetensors.index.json
    dict(name="hidden96_sharded_f16", hidden_size=96, intermediate_size=200, num_hidden_layers=3,
         num_attention_heads=3, num_key_value_heads=1, head_dim=48, vocab_size=300,
         tie_word_embeddings=True, rope_theta=1000000.0, dtype=torch.float16, shard="150KB"),
]


def is_ternary(name):
    return not name.endswith("norm.weight")


def row_groups(w):
    cols = w.shape[1]
    return [(a, min(a + GROUP, cols)) for a in range(0, cols, GROUP)]


def scales(w, rule):
    out = []
    for a, b in row_groups(w):
        g = w[:, a:b].abs()
        out.append((g.mean(dim=1) if rule == "mean_abs" else g.amax(dim=1), a, b))
    return out


def stored_scale(g, rule):
    """The scale of each row of the group `g` as the GGUF stores it and tern multiplies by: in
    float32 as tern computes it (a sum in row order, not numpy's pairwise one), then float16."""
    a = np.abs(g.float().numpy())
    if rule == "mean_abs":
        s = np.add.accumulate(a, axis=1, dtype=np.float32)[:, -1] / np.float32(a.shape[1])
    else:
        s = a.max(axis=1)
    return torch.from_numpy(s.astype(np.float16)).double()


def ternarize(w, rule):
    w = w.double()
    q = torch.zeros_like(w)
    for s, a, b in scales(w, rule):
        s = s[:, None]
        r = w[:, a:b] / s.clamp_min(1e-30)
        t = torch.sign(r) * torch.floor(r.abs() + 0.5)  # round half away from zero
        q[:, a:b] = t.clamp(-1, 1) * stored_scale(w[:, a:b], rule)[:, None]
    return q


def nudge(w, dtype):
    """Moves weights whose |w/s| is within MARGIN of 0.5 (under either scale rule) away from it,
    re-rounding to the storage dtype, until no weight is that close."""
    w = w.to(dtype).double()
    for _ in range(100):
        bad = torch.zeros_like(w, dtype=torch.bool)
        direction = torch.zeros_like(w)
        for rule in ("mean_abs", "max_abs"):
            for s, a, b in scales(w, rule):
                r = (w[:, a:b] / s[:, None].clamp_min(1e-30)).abs()
                near = (r - 0.5).abs() < MARGIN
                bad[:, a:b] |= near
                direction[:, a:b] = torch.where(near, torch.sign(r - 0.5 + 1e-12), direction[:, a:b])
        if not bad.any():
            return w
        w = torch.where(bad, w * (1 + 0.03 * direction), w).to(dtype).double()
    raise SystemExit("could not move weights off the rounding boundary")


def build(spec, out_root):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234 + len(spec["name"]))
    cfg = Qwen3Config(
        hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"], head_dim=spec["head_dim"],
        vocab_size=spec["vocab_size"], tie_word_embeddings=spec["tie_word_embeddings"],
        rope_theta=spec["rope_theta"], rms_norm_eps=1e-6, max_position_embeddings=512,
        attention_bias=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = "eager"
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_ternary(name):
                w = torch.randn(p.shape, generator=gen, dtype=torch.float64) * p.shape[1] ** -0.5
                if name == "model.embed_tokens.weight":
                    w[5, :] = 0.0  # an all-zero row: its groups must project to zeros
                p.copy_(nudge(w, spec["dtype"]).float())
            else:
                w = 1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.copy_(w.to(spec["dtype"]).float())

    d = out_root / spec["name"]
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("*.safetensors*"):
        old.unlink()
    kw = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    model.to(spec["dtype"]).save_pretrained(d, safe_serialization=True, **kw)
    # The reference is what transformers computes from the files as written. (Reusing `model`
    # would be wrong: .to(bf16) also rounds the rotary inv_freq buffer.)
    ref = Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager").eval()

    ids = torch.randint(0, spec["vocab_size"], (2, SEQ), generator=gen)
    ids[0, 3] = 5  # the zero embedding row
    expected = {"input_ids": ids.to(torch.int64)}
    with torch.no_grad():
        expected["logits_full"] = ref(input_ids=ids).logits.float()
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        for rule in ("mean_abs", "max_abs"):
            for name, p in ref.named_parameters():
                if is_ternary(name):
                    p.copy_(ternarize(state[name], rule))
            if spec["tie_word_embeddings"]:
                assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
            expected[f"logits_ternary_{rule}"] = ref(input_ids=ids).logits.float()
            ref.load_state_dict(state)
    save_file({k: v.contiguous() for k, v in expected.items()},
              str(out_root / f"{spec['name']}.expected.safetensors"))
    files = sorted(p.name for p in d.iterdir())
    print(spec["name"], files, {k: tuple(v.shape) for k, v in expected.items()})


def main():
    out_root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/qwen3")
    out_root.mkdir(parents=True, exist_ok=True)
    for spec in FIXTURES:
        build(spec, out_root)
    (out_root / "README.md").write_text(
        "Generated by scripts/make_fixtures.py (transformers "
        f"{__import__('transformers').__version__}, torch {torch.__version__}).\n"
        "Each folder is an HF-layout Qwen3 checkpoint with random weights; NAME.expected.safetensors\n"
        "holds input_ids [2,16] and the logits transformers computes in float64: full precision,\n"
        "and after ternarizing with group 128 and scale mean_abs / max_abs (stored as f16).\n")


if __name__ == "__main__":
    main()
