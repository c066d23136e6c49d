#!/usr/bin/env python3
"""transformers' perplexity of a GGUF model on given token ids, scored as `tern eval` (plain
scheme) scores them: consecutive windows of --ctx tokens, every token but each window's first
scored from the tokens before it in its window. The weights are the GGUF's, dequantized by
gguf-py inside transformers (the independent check of tern's GGUF reading and forward).

  tern tokenizer encode --tokenizer M.gguf -f heldout.txt > ids.json
  python3 scripts/hf_reference_eval.py --gguf M.gguf --ids ids.json --ctx 512

Needs: pip install torch transformers gguf accelerate. Prints one JSON line: tokens, mean NLL, PPL.
"""
import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    g = Path(a.gguf)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    ids = json.load(open(a.ids))
    windows = [ids[s:s + a.ctx] for s in range(0, len(ids), a.ctx)]
    windows = [w for w in windows if len(w) >= 2]
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), a.batch):
            group = windows[i:i + a.batch]
            # Windows differ in length only at the end of the text: those run one at a time.
            same = [w for w in group if len(w) == len(group[0])]
            rest = [w for w in group if len(w) != len(group[0])]
            for batch in ([same] if same else []) + [[w] for w in rest]:
                x = torch.tensor(batch)
                logits = model(input_ids=x[:, :-1]).logits.double()
                lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)
                nll -= lp.sum().item()
                n += lp.numel()
    print(json.dumps({"tokens": n, "nll": nll / n, "ppl": math.exp(nll / n),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
