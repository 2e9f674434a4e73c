"""
Steering with an SAE latent (paper Sec. 5.2, Eq. 8): does the adapted model still respond to the SAE's features?

x <- x + alpha (x . v) v at the SAE's layer, v the unit-normalised decoder row of --latent, applied to every position
of the model *without* the SAE spliced (the authors' run_steering.py hooks the plain layer output; the SAE only
supplies v; --steering-splice true steers the reconstruction instead, in both formulations below). Two formulations,
both reported, scored from the same forward passes (eval.json "steering" / "steering_authors", one eval.md table each):

ours: a text's score is its mean next-token log-likelihood (position t-1 predicts token t, all tokens after BOS).
Normalisation, per model and per text set (positives, all --steering-neg files together, validation negatives): the
unsteered scores are mapped affinely onto 0..100 (min -> 0, max -> 100) and the steered ones with the same map; the
change is normalised steered - normalised unsteered. alpha is tuned per model over --alphas to maximise mean
change(positive) - mean change(validation negatives); the negative test set is scored at that alpha. POSITIVE /
NEGATIVE (Table 4) = per-text change of the LoRA model minus that of the base model, mean with a 90% normal CI.

authors, as eval/steering/run_steering.py computes it (line numbers of that file):
- LL (56-70): log_probs[1:].gather(token_ids[1:]).mean(): position t is scored on the token it holds, t, not on the
  next one (off by one, kept as they compute it), for t = 1..n (BOS excluded, the last position included).
- the hook (127-131) adds alpha (x . d) d with d the raw decoder row: their --alpha = ours / |d|^2
  ("alpha_run_steering"; the same for unit-norm rows, as their sparsify SAEs have).
- normalisation (72-82, called per model and per dataset by main, 93-211): the same 0..100 map, but each negative
  dataset (each --steering-neg file: their law, arabic, shakespeare, recipes) on its own.
- one alpha for both models (23, 341-348: one --alpha passed to both): --alpha, or over --alphas the one that
  maximises mean change(positive) - mean change(validation negatives) in this formulation on the base model (their
  --tuning runs score the biology set by hand).
- order (190-200): each model's changes sorted by its own normalised unsteered LL; POSITIVE / NEGATIVE (216-234 on
  307-325, 366-371) subtract base from LoRA element-wise, i.e. pair texts by that rank, not by identity (the same
  mean, another CI); negatives pooled over datasets in order; 90% Student-t CI (scipy.stats.t.interval).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from plumbing import common
from evals import confidence
from formats.corpus import jsonl_texts
from evals.multiple_choice import score, setting_context
from splice import splice_hooks


OURS = ("ours: next-token log-likelihood, alpha tuned per model, negatives normalised together, texts paired by "
        "identity, 90% normal CI")
AUTHORS = ("authors (as run_steering.py computes it: position t scored on token t), one alpha for both models, "
           "normalised per negative dataset, texts paired by rank of unsteered LL, 90% t CI")


def requested(cfg) -> bool:
    return cfg.steering_pos is not None or bool(cfg.steering_neg) or cfg.steering_neg_val is not None


def read_inputs(cfg) -> dict[str, list[str]]:
    """The steering texts named by eval.py's flags, checked before any model work: keys pos, neg/<file name> (one per
    --steering-neg, in order), neg_val."""
    if cfg.steering_pos is None or cfg.latent is None:
        raise ValueError("steering needs --steering-pos (texts) and --latent (the SAE latent to steer with)")
    if cfg.alpha is None and cfg.steering_neg_val is None and len(cfg.alphas.split(",")) > 1:
        raise ValueError("tuning alpha needs --steering-neg-val (validation negatives); or pass --alpha")
    texts = {"pos": read_texts(cfg.steering_pos, "--steering-pos")}
    names = [os.path.splitext(os.path.basename(p))[0] for p in cfg.steering_neg]
    for i, (name, path) in enumerate(zip(names, cfg.steering_neg)):
        texts[f"neg/{name if names.count(name) == 1 else f'{i}_{name}'}"] = read_texts(path, "--steering-neg")
    if cfg.steering_neg_val is not None:
        texts["neg_val"] = read_texts(cfg.steering_neg_val, "--steering-neg-val")
    return texts


def read_texts(path: str, what: str) -> list[str]:
    """jsonl ({"text": ...} or a string per line), or the authors' .json datasets ({"examples": [...]})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                texts = json.load(f)["examples"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{what} {path}: expected a JSON object {{\"examples\": [texts]}}") from None
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{what} {path}: \"examples\" must be a list of strings")
        else:
            texts = list(jsonl_texts(f, path))
    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:  # the 0..100 normalisation needs a spread of likelihoods
        raise ValueError(f"{what} {path}: {len(texts)} texts; steering needs at least 2")
    return texts


def steer_hook(v: torch.Tensor, alpha: float, inner=None):
    def hook(x):
        x = inner(x) if inner is not None else x
        vv = v.to(x.dtype)
        return x + alpha * (x @ vv)[..., None] * vv  # Eq. 8
    return hook


def steering_eval(model, seqs: dict, saes, d, layer, unspliced_ids, cfg, autocast_ctx, setting: str,
                  authors_alpha=None):
    """Both formulations for one model (setting "original": adapters off; "lora": adapters on): (ours, authors'),
    every text set scored unsteered and steered along d (the raw decoder row), alpha tuned (or fixed).
    authors_alpha: the base model's choice, which the authors' formulation keeps for the LoRA model."""
    norm = float(d.norm())
    v = d / max(norm, 1e-12)
    negs = [k for k in seqs if k.startswith("neg/")]
    # one forward per text and alpha scores both: ours (position p-1 on token p) and the authors' (p on token p)
    queries = {k: [[(p - 1, s[p]) for p in range(1, len(s))] + [(p, s[p]) for p in range(1, len(s))] for s in ss]
               for k, ss in seqs.items()}
    cache = {}

    def loglik(f, name, alpha):  # per-text mean log-likelihood in formulation f; ours' "neg": all negatives together
        if name == "neg":
            return np.concatenate([loglik(f, k, alpha) for k in negs])
        if (name, alpha) not in cache:
            def hooks_for(idx):
                hooks = splice_hooks(saes, idx, unspliced_ids) if cfg.steering_splice else {}
                if alpha is not None:
                    hooks[layer] = steer_hook(v, alpha, hooks.get(layer))
                return hooks
            lps = score(model, seqs[name], queries[name], hooks_for, autocast_ctx, cfg.bench_batch, cfg.chunk)
            cache[name, alpha] = {"ours": np.array([lp[:len(lp) // 2].mean() for lp in lps]),
                                  "authors": np.array([lp[len(lp) // 2:].mean() for lp in lps])}
        return cache[name, alpha][f]

    def change(f, name, alpha):  # normalised steered - normalised unsteered (Pres et al.'s 0..100 scale)
        base, steered = loglik(f, name, None), loglik(f, name, alpha)
        lo, scale = base.min(), base.max() - base.min()
        scale = scale if scale > 0 else 1.0
        if f == "ours":
            return 100 * (steered - base) / scale
        b, st = 100 * (base - lo) / scale, 100 * (steered - lo) / scale  # run_steering.py:76-80, then 320
        return (st - b)[np.argsort(b, kind="stable")]  # 190: sorted by the normalised unsteered LL

    grid = [cfg.alpha] if cfg.alpha is not None else [float(a) for a in cfg.alphas.split(",")]
    prog = common.Progress(len(grid) + 1, f"steering [{setting}]: unsteered, then alphas")
    with setting_context(model, setting):
        for name in seqs:
            loglik("ours", name, None)
        prog.step()
        tuning = {"ours": [], "authors": []}
        for a in grid:  # the paper's tuning rule: raise the positives, not the validation negatives
            for f, rows in tuning.items():
                pos = change(f, "pos", a).mean()
                val = change(f, "neg_val", a).mean() if "neg_val" in seqs else 0.0
                rows.append({"alpha": a, "pos": pos, "neg_val": val, "objective": pos - val})
            prog.step()
        best = max(tuning["ours"], key=lambda r: r["objective"])["alpha"]  # the first of equal objectives
        a_auth = authors_alpha if authors_alpha is not None else \
            max(tuning["authors"], key=lambda r: r["objective"])["alpha"]
        ours = {"alpha": best, "tuning": tuning["ours"], "pos": change("ours", "pos", best).tolist(),
                "loglik_unsteered": {k: loglik("ours", k, None).tolist() for k in ["pos", "neg", "neg_val"]
                                     if k in seqs or (k == "neg" and negs)}}
        authors = {"alpha": a_auth, "alpha_run_steering": a_auth / max(norm, 1e-12) ** 2, "decoder_norm": norm,
                   "alpha_from": "--alpha" if cfg.alpha is not None else "tuned on the base model",
                   "tuning": tuning["authors"],
                   "pos": change("authors", "pos", a_auth).tolist(),
                   "neg": {k[4:]: change("authors", k, a_auth).tolist() for k in negs},
                   "loglik_unsteered": {k: loglik("authors", k, None).tolist() for k in seqs},
                   "loglik_steered": {k: loglik("authors", k, a_auth).tolist() for k in ["pos", *negs]}}
        if negs:
            ours["neg"] = change("ours", "neg", best).tolist()
    for res, neg in ((ours, ours.get("neg")), (authors, sum(authors["neg"].values(), []))):
        res["pos_mean"] = float(np.mean(res["pos"]))
        if negs:
            res["neg_mean"] = float(np.mean(neg))  # the authors': pooled over datasets (run_steering.py:366-367)
    authors["neg_mean_by_dataset"] = {k: float(np.mean(x)) for k, x in authors["neg"].items()}
    return ours, authors


def steering_compare(base: dict, lora: dict) -> dict:
    """POSITIVE and NEGATIVE of Table 4, ours: per-text change (LoRA model) - change (base model), 90% normal CI."""
    out = {}
    for k in ("pos", "neg"):
        if k in base:
            out["POSITIVE" if k == "pos" else "NEGATIVE"] = confidence.mean_ci(np.array(lora[k]) - np.array(base[k]))
    return out


def authors_compare(base: dict, lora: dict) -> dict:
    """POSITIVE and NEGATIVE as run_steering.py computes them (stat_eval, 216-234): LoRA changes - base changes
    element-wise in each model's own order (rank of unsteered LL), negatives pooled over datasets in order (366-367),
    90% Student-t CI; NEGATIVE per dataset besides (their per-dataset plots, 365)."""
    out = {"POSITIVE": confidence.mean_ci(np.array(lora["pos"]) - np.array(base["pos"]), t=True)}
    by = {k: np.array(lora["neg"][k]) - np.array(base["neg"][k]) for k in base["neg"]}
    if by:
        out["NEGATIVE"] = confidence.mean_ci(np.concatenate(list(by.values())), t=True)
        out["NEGATIVE_by_dataset"] = {k: confidence.mean_ci(x, t=True) for k, x in by.items()}
    return out


def markdown(res: dict) -> list[str]:
    """The steering tables of eval.md, one per formulation."""
    L = []
    for key, cmp, what in (("steering", "steering_compare", OURS), ("steering_authors", "steering_authors_compare",
                                                                      AUTHORS)):
        st = res[key]
        alpha = "" if key == "steering" else (f" alpha is along the unit direction; run_steering.py's --alpha = alpha "
                                              f"/ |d|^2 = {st['base']['alpha_run_steering']:g}.")
        L += ["", f"## Steering latent {st['latent']} at layer {st['layer']}: {what.split(',')[0]}", "",
              f"Change in normalised log-likelihood (0..100 scale). {what[0].upper() + what[1:]}.{alpha}", "",
              "| model | alpha | positive | negative | POSITIVE (LoRA - base) | NEGATIVE |",
              "| --- | --- | --- | --- | --- | --- |"]
        b = st["base"]
        L.append(f"| base | {b['alpha']:g} | {b['pos_mean']:+.2f} | {confidence.fmt_num(b.get('neg_mean'), '+.2f')} | | |")
        for g in res["groups"]:
            if key in g:
                s, c = g[key], g[cmp]
                L.append(f"| {g['name']} | {s['alpha']:g} | {s['pos_mean']:+.2f} | "
                         f"{confidence.fmt_num(s.get('neg_mean'), '+.2f')} | {confidence.fmt_ci(c.get('POSITIVE'), 2)} | "
                         f"{confidence.fmt_ci(c.get('NEGATIVE'), 2)} |")
                if key == "steering_authors" and len(c.get("NEGATIVE_by_dataset", {})) > 1:
                    L += [f"| {g['name']}: {k} | | | {s['neg_mean_by_dataset'][k]:+.2f} | | {confidence.fmt_ci(ci, 2)} |"
                          for k, ci in c["NEGATIVE_by_dataset"].items()]
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
