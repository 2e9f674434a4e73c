"""Tiny random fixtures shared by the training-script tests: a model folder, a token dataset, SAEs."""
import json
import os

import numpy as np
import torch

from model import ModelConfig, Transformer
from sae import SAE

VOCAB, BOS, EOS = 512, 1, 2


def make_model(folder, family="llama3", init_std=0.1, seed=0) -> str:
    cfg = ModelConfig.from_name(f"tiny-{family}")
    cfg.init_std, cfg.bos_token_id, cfg.eos_token_id = init_std, BOS, EOS
    Transformer(cfg).init_weights(seed).save_pretrained(str(folder))
    return str(folder)


def make_data(folder, n_train=60_000, n_val=8_000, seed=0) -> str:
    """Token shards in data.prepare's layout. A Markov chain, so that there is something to model."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    nxt = rng.integers(3, VOCAB, size=(VOCAB, 4))
    for split, n in (("train", n_train), ("val", n_val)):
        toks = np.empty(n, dtype=np.uint16)
        t = 3
        for i in range(n):
            t = BOS if i % 200 == 0 else int(nxt[t, rng.integers(0, 4)])
            toks[i] = t
        toks.tofile(os.path.join(folder, f"{split}.bin"))
    meta = dict(vocab_size=VOCAB, dtype="uint16", train_tokens=n_train, val_tokens=n_val, bos_id=BOS, eos_id=EOS,
                source="test", seed=seed)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(folder)


def make_sae(folder, arch="topk", layer=1, d=64, m=256, k=4, seed=0) -> str:
    torch.manual_seed(seed)
    sae = SAE(d, m, arch, k=None if arch == "jumprelu" else k, layer=layer)
    if arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.fill_(0.05)
    sae.save(str(folder))
    return str(folder)


def identity_sae(d=64, layer=1) -> SAE:
    """Reconstructs exactly: d_sae = 2 d, codes are relu(x) and relu(-x), decoded back as x."""
    sae = SAE(d, 2 * d, "topk", k=2 * d, layer=layer, apply_b_dec_to_input=False)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def make_trained_model(folder, data_dir, family="llama3", steps=150, seed=0) -> str:
    """A tiny model that has learned the Markov chain of make_data: its residual stream matters, so an SAE
    spliced into it opens a real CE gap (a random model's CE is flat whatever one splices in)."""
    from data import TokenLoader
    torch.manual_seed(seed)
    cfg = ModelConfig.from_name(f"tiny-{family}")
    cfg.bos_token_id, cfg.eos_token_id = BOS, EOS
    model = Transformer(cfg).init_weights(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = TokenLoader(data_dir, "train", 16, 32, seed=seed)
    for _ in range(steps):
        idx = loader.next_batch()
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(folder))
    return str(folder)
