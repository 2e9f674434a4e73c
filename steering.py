"""
Steering with an SAE latent (paper Sec. 5.2, Eq. 8): does the adapted model still respond to the SAE's features?

x <- x + alpha (x . v) v at the SAE's layer, v the unit-normalised decoder row of --latent, applied to every position
of the model *without* the SAE spliced (the authors' run_steering.py hooks the plain layer output; the SAE only
supplies v; --steering-splice true steers the reconstruction instead). A text's score is its mean next-token
log-likelihood (all tokens after BOS). Normalisation, per model and per text set: the unsteered scores are mapped
affinely onto 0..100 (min -> 0, max -> 100) and the steered ones with the same map; the change is normalised steered -
normalised unsteered. alpha is tuned per model over --alphas to maximise mean change(positive) - mean change
(validation negatives); the negative test set is scored at that alpha. POSITIVE / NEGATIVE (Table 4) = per-text change
of the LoRA model minus that of the base model, mean with a 90% normal CI.
"""
from __future__ import annotations

import os

import numpy as np
import torch

import common
from corpus import jsonl_texts
from splice import score, setting_context, splice_hooks


def read_inputs(cfg) -> dict[str, list[str]]:
    """The steering texts named by eval.py's flags, checked before any model work."""
    if cfg.steering_pos is None or cfg.latent is None:
        raise ValueError("steering needs --steering-pos (texts) and --latent (the SAE latent to steer with)")
    if cfg.alpha is None and cfg.steering_neg_val is None and len(cfg.alphas.split(",")) > 1:
        raise ValueError("tuning alpha needs --steering-neg-val (validation negatives); or pass --alpha")
    return {key: read_texts(path, f"--steering-{key.replace('_', '-')}") for key, path in
            (("pos", cfg.steering_pos), ("neg", cfg.steering_neg), ("neg_val", cfg.steering_neg_val))
            if path is not None}


def read_texts(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        texts = [t for t in jsonl_texts(f, path) if t.strip()]
    if len(texts) < 2:  # the 0..100 normalisation needs a spread of likelihoods
        raise ValueError(f"{what} {path}: {len(texts)} texts; steering needs at least 2")
    return texts


def steer_hook(v: torch.Tensor, alpha: float, inner=None):
    def hook(x):
        x = inner(x) if inner is not None else x
        vv = v.to(x.dtype)
        return x + alpha * (x @ vv)[..., None] * vv  # Eq. 8
    return hook


def steering_eval(model, seqs: dict, saes, v, layer, keep, cfg, amp, setting: str) -> dict:
    """Mean next-token log-likelihood of every text set unsteered and steered, alpha tuned (or fixed), for one model
    (setting "original": adapters off; "lora": adapters merged)."""
    queries = {k: [[(p - 1, s[p]) for p in range(1, len(s))] for s in ss] for k, ss in seqs.items()}

    def loglik(name, alpha):
        def hooks_for(idx):
            hooks = splice_hooks(saes, idx, keep) if cfg.steering_splice else {}
            if alpha is not None:
                hooks[layer] = steer_hook(v, alpha, hooks.get(layer))
            return hooks
        lps = score(model, seqs[name], queries[name], hooks_for, amp, cfg.bench_batch, cfg.chunk)
        return np.array([lp.mean() for lp in lps])

    def change(name, base, alpha):  # normalised steered - normalised unsteered (Pres et al.'s 0..100 scale)
        lo, hi = base.min(), base.max()
        return 100 * (loglik(name, alpha) - base) / (hi - lo if hi > lo else 1.0)

    grid = [cfg.alpha] if cfg.alpha is not None else [float(a) for a in cfg.alphas.split(",")]
    prog = common.Progress(len(grid) + 1, f"steering [{setting}]: unsteered, then alphas")
    with setting_context(model, setting):
        base = {name: loglik(name, None) for name in seqs}
        tuning, best = [], None
        prog.step()
        for a in grid:  # the paper's tuning rule: raise the positives, not the validation negatives
            pos = change("pos", base["pos"], a)
            val = change("neg_val", base["neg_val"], a) if "neg_val" in seqs else np.zeros(1)
            tuning.append({"alpha": a, "pos": pos.mean(), "neg_val": val.mean(), "objective": pos.mean() - val.mean()})
            if best is None or tuning[-1]["objective"] > best[0]:
                best = (tuning[-1]["objective"], a, pos)
            prog.step()
        res = {"alpha": best[1], "tuning": tuning, "pos": best[2].tolist(), "loglik_unsteered": {
            k: b.tolist() for k, b in base.items()}}
        if "neg" in seqs:
            res["neg"] = change("neg", base["neg"], best[1]).tolist()
    for k in ("pos", "neg"):
        if k in res:
            res[f"{k}_mean"] = float(np.mean(res[k]))
    return res


def steering_compare(base: dict, lora: dict) -> dict:
    """POSITIVE and NEGATIVE of Table 4: per-text change (LoRA model) - change (base model), 90% CI."""
    out = {}
    for k in ("pos", "neg"):
        if k in base:
            out["POSITIVE" if k == "pos" else "NEGATIVE"] = common.mean_ci(np.array(lora[k]) - np.array(base[k]))
    return out


def markdown(res: dict) -> list[str]:
    """The steering table of eval.md."""
    st = res["steering"]
    L = ["", f"## Steering latent {st['latent']} at layer {st['layer']} (change in normalised log-likelihood, "
         f"0..100 scale)", "", "| model | alpha | positive | negative | POSITIVE (LoRA - base) | NEGATIVE |",
         "| --- | --- | --- | --- | --- | --- |"]
    b = st["base"]
    L.append(f"| base | {b['alpha']:g} | {b['pos_mean']:+.2f} | {common.fmt_num(b.get('neg_mean'), '+.2f')} | | |")
    for g in res["groups"]:
        if "steering" in g:
            s, c = g["steering"], g["steering_compare"]
            L.append(f"| {g['name']} | {s['alpha']:g} | {s['pos_mean']:+.2f} | "
                     f"{common.fmt_num(s.get('neg_mean'), '+.2f')} | {common.fmt_ci(c.get('POSITIVE'), 2)} | "
                     f"{common.fmt_ci(c.get('NEGATIVE'), 2)} |")
    return L


def plot(plt, res: dict, g: dict):
    """Figs. 7 / 10: per-text change after steering, base model vs LoRA model."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, k in zip(axes, ("pos", "neg")):
        if k in g["steering"]:
            ax.hist(res["steering"]["base"][k], bins=40, alpha=0.5, color="blue", label="base model")
            ax.hist(g["steering"][k], bins=40, alpha=0.5, color="green", label="LoRA model")
            ax.set_title("positive" if k == "pos" else "negative"), ax.legend()
            ax.set_xlabel("change in normalised LL after steering")
    return fig
