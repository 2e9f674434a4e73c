"""
The other objective adapt.py offers (--objective ce): Resa's "SAE-Tuning" (arXiv 2506.09967) trains the adapters around
a frozen, spliced SAE on the next-token cross-entropy of prompt / answer pairs, the prompt masked, instead of on the
KL to the original model (Eq. 7). This file holds that objective and its data:

    pairs = load_pairs("qa.jsonl", tok, seq_len)     # one {"prompt": ..., "answer": ...} object per line
    loss = answer_losses(model, h, idx, mask, chunk=2048)[0].mean()   # mean CE over the batch's answer tokens

A pair is tokenized as BOS + prompt + answer + EOS (the texts as written: a chat template, if wanted, belongs in the
file), cut to seq_len tokens; position t is trained when token t + 1 belongs to the answer or is the closing EOS, as
transformers' causal-LM loss does with the prompt's labels set to -100 (tests/test_answers.py checks it against that
function). Held out: the file's last tenth of the pairs (at least one), on which `evaluate_answers` reports the answer
CE and the share of answer tokens predicted exactly (greedy) of the original model, with the SAE(s) spliced in, and
with them and the adapters.
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plumbing.common import log
from lora import adapters_disabled, lora_modules
from splice import spliced_pass


def load_pairs(path: str, tok, seq_len: int) -> list[tuple[list[int], int]]:
    """(token ids, number of ids before the answer) per line of a JSONL file; one-line errors for bad lines."""
    pairs = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise FileNotFoundError(f"--pairs {path}: cannot read it ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--pairs {path}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("prompt", "answer")):
            raise ValueError(f'--pairs {path}:{n}: expected {{"prompt": "...", "answer": "..."}} with string values')
        prompt = tok.encode(obj["prompt"], bos=True)
        ids = (prompt + tok.encode(obj["answer"], eos=True))[:seq_len]
        if len(ids) <= len(prompt):
            raise ValueError(f"--pairs {path}:{n}: the prompt fills all {seq_len} tokens of --seq-len: no answer token "
                             f"is left to train on; raise --seq-len or shorten the prompt")
        pairs.append((ids, len(prompt)))
    if len(pairs) < 2:
        raise ValueError(f"--pairs {path}: {len(pairs)} pairs; at least 2 are needed (the last tenth is held out)")
    return pairs


def split_pairs(pairs: list) -> tuple[list, list]:
    """(training pairs, held-out pairs): the file's last tenth, at least one, is held out."""
    n_val = max(1, len(pairs) // 10)
    return pairs[:-n_val], pairs[-n_val:]


def read_pairs(path: str, model_id: str, seq_len: int) -> tuple[list, list, int]:
    """--pairs in the tokens of `model_id`'s tokenizer: (training pairs, held-out pairs, the id that pads a batch)."""
    from formats.tokenizer import load_tokenizer
    tok = load_tokenizer(model_id)
    train, held_out = split_pairs(load_pairs(path, tok, seq_len))
    log(f"pairs {path}: {len(train)} for training, {len(held_out)} held out")
    return train, held_out, tok.pad_id if tok.pad_id is not None else tok.eos_id


def collate(pairs, device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, mask), each (B, T) with T the longest pair: ids right-padded with pad_id (causal attention: padding after
    a sequence never reaches it), mask True at each position whose next token is an answer token."""
    T = max(len(ids) for ids, _ in pairs)
    idx = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(pairs), T, dtype=torch.bool)
    for b, (ids, n_prompt) in enumerate(pairs):
        idx[b, :len(ids)] = torch.tensor(ids)
        mask[b, n_prompt - 1:len(ids) - 1] = True  # position t predicts token t + 1: the first answer token onwards
    return idx.to(device), mask.to(device)


class PairLoader:
    """Batches of `micro` pairs per process, in a fresh seeded order each epoch; state_dict / load_state_dict for an
    exact resume. The global batch of a step is `micro x world_size` consecutive pairs of the order, rank r taking
    the r-th slice."""

    def __init__(self, pairs, micro: int, rank: int, world_size: int, seed: int, device, pad_id: int = 0):
        self.pairs, self.micro, self.rank, self.world, self.seed = pairs, micro, rank, world_size, seed
        self.device, self.pad_id = device, pad_id
        self.epoch, self.pos = 0, 0
        if len(pairs) < micro * world_size:
            raise ValueError(f"--pairs: {len(pairs)} training pairs for a global micro-batch of {micro * world_size}: "
                             f"lower --batch-size / --micro-batch or give more pairs")

    def _order(self):
        return torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_batch(self):
        step = self.micro * self.world
        if self.pos + step > len(self.pairs):  # a partial global batch is dropped: every rank moves on together
            self.epoch, self.pos = self.epoch + 1, 0
        order = self._order()[self.pos + self.rank * self.micro:self.pos + (self.rank + 1) * self.micro]
        self.pos += step
        return collate([self.pairs[i] for i in order], self.device, self.pad_id)

    def state_dict(self):
        return dict(epoch=self.epoch, pos=self.pos)

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


def _chunk_answer_losses(model, h, targets):
    logits = model.head(h).float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    with torch.no_grad():
        right = (logits.argmax(-1) == targets).float()
    return ce, right


def answer_losses(model, h, idx, mask, *, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer token of the batch: the CE of the model whose final stream is h (with grad where h has it) and
    whether its most likely next token is the right one; the lm_head runs `chunk` positions at a time (under
    activation checkpointing when h needs gradients, as splice.kl_and_ce)."""
    hs, targets = h[:, :-1][mask[:, :-1]], idx[:, 1:][mask[:, :-1]]
    recompute = hs.requires_grad and hs.shape[0] > chunk
    parts = []
    for s in range(0, hs.shape[0], chunk):
        args = (model, hs[s:s + chunk], targets[s:s + chunk])
        parts.append(checkpoint(_chunk_answer_losses, *args, use_reentrant=False) if recompute
                     else _chunk_answer_losses(*args))
    ce, right = (torch.cat(p) for p in zip(*parts))
    return ce, right


def answer_step(model, saes, batch, unspliced_ids, chunk: int, autocast_ctx):
    """One micro-batch of the CE objective, as adapt.py's loop wants it: (kl, ce, loss): ce per answer token, loss
    their mean, kl NaN (no original pass is run)."""
    idx, mask = batch
    with autocast_ctx:
        ce, _ = answer_losses(model, spliced_pass(model, saes, idx, unspliced_ids), idx, mask, chunk=chunk)
    return torch.full_like(ce, math.nan), ce, ce.mean()


@torch.no_grad()
def evaluate_answers(model, saes, pairs, unspliced_ids=(), *, micro: int, chunk: int, autocast_ctx,
                     pad_id: int = 0) -> dict:
    """answer_ce_{base,sae[,sae_lora]}: the mean CE over every answer token of the held-out pairs; answer_acc_*: the
    share of them the model predicts exactly (argmax); answer_tokens: how many. base is the original model (no SAE,
    no adapters), sae_lora the adapted one with the SAE(s) (only when adapters exist)."""
    adapted, was_training = bool(lora_modules(model)), model.training
    model.eval()
    sums, n = {}, 0
    for s in range(0, len(pairs), micro):
        idx, mask = collate(pairs[s:s + micro], next(model.parameters()).device, pad_id)
        with autocast_ctx:
            with adapters_disabled(model):
                finals = {"base": spliced_pass(model, [], idx), "sae": spliced_pass(model, saes, idx, unspliced_ids)}
            if adapted:
                finals["sae_lora"] = spliced_pass(model, saes, idx, unspliced_ids)
            for name, h in finals.items():
                ce, right = answer_losses(model, h, idx, mask, chunk=chunk)
                sums[f"answer_ce_{name}"] = sums.get(f"answer_ce_{name}", 0.0) + ce.double().sum().item()
                sums[f"answer_acc_{name}"] = sums.get(f"answer_acc_{name}", 0.0) + right.double().sum().item()
        n += int(mask[:, :-1].sum())
    model.train(was_training)
    return {**{k: v / n for k, v in sums.items()}, "answer_tokens": n}
