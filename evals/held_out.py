"""
The numbers every script reports on held-out windows, each defined once (every script and JSON file uses these names
for these numbers only), on the predicted positions of splice.py (all but each window's last; positions the SAE does
not replace count too):

- CE: -log p(token t + 1 | tokens <= t), the mean over every predicted position of every window (summed, then divided
  by the count: not a mean of per-window means). ce_base: the original model (L_BASE); ce_sae: the SAE(s) spliced in
  (L_SAE; with several SAEs, the compound CE of Sec. 4.3); ce_sae_lora: the SAE(s) spliced into the adapted model.
- KL: KL(p_orig || p) at a predicted position, summed over the vocabulary, then the mean over the same positions as
  CE; p_orig is the original model (no SAE, no adapters). kl_sae, kl_sae_lora.
- gap_closed: (ce_sae - ce_sae_lora) / (ce_sae - ce_base), the "percentage of CE loss gap closed" of Fig. 3 and
  Sec. 4.1; undefined (NaN, null in JSON) when the SAE costs no loss.

adapt.py, train_sae.py and train_e2e.py report `evaluate`'s numbers; eval.py computes the same ones from the same
pieces (kl_and_ce, accumulate, position_means, gap_closed).
"""
from __future__ import annotations

import torch

from plumbing import distributed
from lora import adapters_disabled, lora_modules
from model import Transformer
from splice import kl_and_ce, spliced_pass


def predicted_positions(idx: torch.Tensor) -> int:
    """A batch's predicted positions: all but each window's last."""
    return idx.shape[0] * (idx.shape[1] - 1)


@torch.no_grad()
def evaluate(model: Transformer, saes, batches, unspliced_ids=(), *, chunk: int = 2048, autocast_ctx) -> dict:
    """ce_base, ce_sae, kl_sae and, for a model with adapters, ce_sae_lora, kl_sae_lora and gap_closed on held-out
    windows (definitions at the top); `positions`: how many predicted positions they average over. The adapters stay
    unmerged, as in training; eval.py runs them the same way (lora.adapters_enabled) and reports these numbers.
    With the norm rule on (unspliced_ids.norm_above), norm_skipped_sae[_lora]: at how many predicted positions it left
    the SAE out, summed over the SAEs."""
    adapted, was_training = bool(lora_modules(model)), model.training
    model.eval()
    sums, n = {}, 0
    for idx in batches:
        with autocast_ctx:
            skipped = {"sae": [], "sae_lora": []}
            with adapters_disabled(model):
                h_orig = spliced_pass(model, [], idx)  # no SAE, no adapters: the original model
                settings = {"sae": spliced_pass(model, saes, idx, unspliced_ids, skipped=skipped["sae"])}
            if adapted:
                settings["sae_lora"] = spliced_pass(model, saes, idx, unspliced_ids, skipped=skipped["sae_lora"])
            for name, h in settings.items():
                kl, ce, ce_orig = kl_and_ce(model, h_orig, h, idx, chunk=chunk)
                accumulate(sums, **{f"kl_{name}": kl, f"ce_{name}": ce})
                if getattr(unspliced_ids, "norm_above", None) is not None:  # counts, not means: undone below
                    accumulate(sums, **{f"norm_skipped_{name}": sum(m[:, :-1].sum() for m in skipped[name])})
        accumulate(sums, ce_base=ce_orig)  # the original model's CE: the same from either setting's call
        n += predicted_positions(idx)
    model.train(was_training)
    res = position_means(sums, n)
    for key in [k for k in res if k.startswith("norm_skipped_")]:
        res[key] = round(res[key] * res["positions"])
    if adapted:
        res["gap_closed"] = gap_closed(res["ce_base"], res["ce_sae"], res["ce_sae_lora"])
    return res


def accumulate(sums: dict, **per_position):
    """sums[key] += the sum of each per-position tensor, kept on the device: no host sync."""
    for key, v in per_position.items():
        sums[key] = sums.get(key, 0) + v.double().sum()


def position_means(sums: dict, n: int) -> dict:
    """Sums over this process's n predicted positions -> means over every process's positions, read back in one host
    sync; `positions`: how many that is."""
    keys = list(sums)
    t = torch.stack([sums[k] for k in keys] + [sums[keys[0]].new_tensor(float(n))])
    t = distributed.all_reduce_mean(t)  # every process's mean sum over the mean count: the mean over all positions
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {**dict(zip(keys, (t[:-1] / t[-1]).tolist())), "positions": round(t[-1].item() * world)}


def gap_closed(ce_base: float, ce_sae: float, ce_sae_lora: float) -> float:
    """The paper's headline number: (CE_sae - CE_sae_lora) / (CE_sae - CE_base); NaN without a gap to close."""
    gap = ce_sae - ce_base
    return (ce_sae - ce_sae_lora) / gap if gap > 0 else float("nan")
