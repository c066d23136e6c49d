#!/usr/bin/env python3
"""Independent references for tern's Llama family (written by transformers and gguf-py, not tern):

1. untied_rope3/: a tiny random LlamaForCausalLM in HF layout: untied head, GQA 4:1, an explicit
   head_dim that is not hidden/heads, Llama-3 rope scaling; untied_rope3.expected.safetensors
   holds input ids [2, 48] and transformers' float64 logits, in full precision and ternarized
   with tern's rule (group 128, mean |w|; the rule lives in make_fixtures.py).
2. tied_quant.gguf: a tiny random tied Llama written as llama.cpp's converter writes one (q/k rows
   interleaved for its RoPE, tokenizer.ggml.* with a byte-level BPE and pre-tokenizer "smollm"),
   its tensors in Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16 and F32 (gguf-py's quantizers); the
   reference logits come from transformers loading that GGUF (gguf-py dequantizes, transformers
   puts q/k rows back), in full precision and ternarized.
3. tied_q4k.gguf (when LLAMA_QUANTIZE names llama.cpp's llama-quantize): the same model requantized
   to Q4_K_M (Q4_K and Q6_K tensors), with its reference logits.

Usage:  python3 scripts/make_llama_fixtures.py tests/fixtures/llama
        (LLAMA_QUANTIZE=build/llama.cpp/src/vendor/llama.cpp/build/bin/llama-quantize for item 3)
Needs:  pip install torch transformers safetensors gguf tokenizers (only to regenerate)
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from make_fixtures import is_ternary, nudge, ternarize  # noqa: E402

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402


def logits_of(model, ids):
    with torch.no_grad():
        full = model(input_ids=ids).logits.float()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for name, p in model.named_parameters():
            if is_ternary(name):
                p.copy_(ternarize(state[name], "mean_abs"))
        tern = model(input_ids=ids).logits.float()
        model.load_state_dict(state)
    return full, tern


def random_llama(cfg, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_ternary(name):
                w = torch.randn(p.shape, generator=gen, dtype=torch.float64) * p.shape[1] ** -0.5
                p.copy_(nudge(w, dtype).float())
            else:
                p.copy_((1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).float())
    return model, gen


def hf_fixture(out):
    cfg = LlamaConfig(
        hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, vocab_size=320, tie_word_embeddings=False,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        attention_bias=False, mlp_bias=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )
    model, gen = random_llama(cfg, 4321)
    d = out / "untied_rope3"
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    ref = LlamaForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=gen)
    full, tern = logits_of(ref, ids)
    save_file({"input_ids": ids, "logits_full": full, "logits_ternary_mean_abs": tern},
              str(out / "untied_rope3.expected.safetensors"))
    print("untied_rope3", sorted(p.name for p in d.iterdir()))


def byte_level_bpe(vocab_size, specials):
    """A byte-level BPE (GPT-2 byte alphabet, merges learned from a small text) as GGUF lists."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    text = (Path(__file__).parent.parent / "README.md").read_text()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text], trainer)
    import json
    model = json.loads(tk.to_str())["model"]
    base = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = list(specials) + [t for t, _ in base]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3] * len(specials) + [1] * len(base)
    assert len(tokens) == vocab_size, len(tokens)
    return tokens, types, merges


def llama_permute(w, n_head):
    """llama.cpp's converter: interleave the two rotary halves of each head's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# The type of each tensor in the GGUF fixture: every llama.cpp legacy quant and a dense type.
TYPES = {
    "token_embd": T.Q8_0, "attn_q": T.Q4_0, "attn_k": T.Q4_1, "attn_v": T.Q5_0,
    "attn_output": T.Q5_1, "ffn_gate": T.Q8_0, "ffn_up": T.F16, "ffn_down": T.Q4_0,
}


def write_gguf(model, cfg, path, tok):
    tokens, types, merges = tok
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tern tiny llama fixture")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        a = p.float().numpy()
        if name in names:
            g = names[name]
        else:
            layer, rest = name[len("model.layers."):].split(".", 1)
            g = f"blk.{layer}.{parts[rest.rsplit('.', 1)[0]]}.weight"
        part = g.split(".")[-2] if g.startswith("blk.") else g.split(".")[0]
        if part == "attn_q":
            a = llama_permute(a, cfg.num_attention_heads)
        elif part == "attn_k":
            a = llama_permute(a, cfg.num_key_value_heads)
        ty = TYPES.get(part, T.F32)
        if ty == T.F32:
            w.add_tensor(g, a.astype(np.float32))
        elif ty == T.F16:
            w.add_tensor(g, a.astype(np.float16))
        else:
            w.add_tensor(g, gguf.quants.quantize(a, ty), raw_dtype=ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_reference(out, name, ids):
    ref = LlamaForCausalLM.from_pretrained(out, gguf_file=f"{name}.gguf", dtype=torch.float32).eval()
    ref = ref.double()
    full, tern = logits_of(ref, ids)
    save_file({"input_ids": ids, "logits_full": full, "logits_ternary_mean_abs": tern},
              str(out / f"{name}.expected.safetensors"))
    print(name, tuple(full.shape), "tied:", ref.config.tie_word_embeddings)


def gguf_fixture(out):
    tok = byte_level_bpe(384, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=384, tie_word_embeddings=True,
        rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=256,
        attention_bias=False, mlp_bias=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
    )
    model, gen = random_llama(cfg, 777)
    write_gguf(model, cfg, out / "tied_quant.gguf", tok)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
    gguf_reference(out, "tied_quant", ids)
    quantize = os.environ.get("LLAMA_QUANTIZE")
    if quantize:
        f32 = out / "tied_f32.tmp.gguf"
        saved = dict(TYPES)
        TYPES.clear()
        write_gguf(model, cfg, f32, tok)
        TYPES.update(saved)
        subprocess.run([quantize, str(f32), str(out / "tied_q4k.gguf"), "Q4_K_M"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        f32.unlink()
        gguf_reference(out, "tied_q4k", ids)


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/llama")
    out.mkdir(parents=True, exist_ok=True)
    hf_fixture(out)
    gguf_fixture(out)
    (out / "README.md").write_text(
        "Generated by scripts/make_llama_fixtures.py (transformers "
        f"{__import__('transformers').__version__}, torch {torch.__version__}, gguf-py).\n"
        "untied_rope3/: HF-layout Llama (untied, GQA 4:1, head_dim 32 != 128/8, Llama-3 rope scaling).\n"
        "tied_quant.gguf: a tied Llama as llama.cpp's converter lays it out, tensors in Q8_0/Q4_0/Q4_1/\n"
        "Q5_0/Q5_1/F16/F32, a byte-level BPE tokenizer (pre smollm). tied_q4k.gguf: the same model\n"
        "requantized by llama-quantize to Q4_K_M. NAME.expected.safetensors: input_ids and the logits\n"
        "transformers computes (from the GGUF for the .gguf files), full precision and ternarized\n"
        "(group 128, mean |w|, the scale stored as f16 as tern stores it).\n")


if __name__ == "__main__":
    main()
