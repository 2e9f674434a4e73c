"""
SAEBench metrics (Karvonen et al. 2024) for one SAE on a model with and without its LoRA adapter: the paper's Sec. 5.1
and Table 6. `python eval.py --saebench` runs it (offline on the embedded pipeline); eval.py calls `evaluate`.

Each model setting (base = adapters off, adapted = adapters on) reads every task's texts once; per text the
layer-L residual (output of block L) and its SAE latents are mean-pooled over real tokens (BOS / EOS / pad excluded,
contexts of 128 tokens) and cached; every probe below is then trained in torch on those cached features.
- core (evals/core): on held-out windows of --data, BOS / EOS / pad left out everywhere (SAEBench's ignore_tokens and
  exclude_special_tokens_from_reconstruction): L0, explained variance (SAEBench 0.6.0's own formula, which subtracts
  the squared mean of x^2 rather than |mean x|^2; kept verbatim) and FVU (the standard sum|x-x_hat|^2 /
  sum|x-mean x|^2), cosine similarity, CE loss score (CE_zero-ablated - CE_sae) / (CE_zero-ablated - CE_clean),
  KL score 1 - KL_sae / KL_zero-ablated, dead latents (never active) and dense latents (active on > 10% of tokens).
- sparse probing (evals/sparse_probing): per class, positives vs an equal number of negatives drawn from the other
  classes; top-k latents by |mean difference| on train; L2 logistic regression (sklearn's objective with C = 1,
  solved to optimum with Newton's method in float64), test accuracy for k = 1, 2, 5, 10, 20, 50; the full-latent
  probe is SAEBench's train_probe_gpu (AdamW 1e-2, batch 250, 100 epochs, best test accuracy, patience 10).
- SCR / TPP (evals/scr_and_tpp): linear probes on the pooled residual (AdamW 1e-3, batch 16, 20 epochs, L1 1e-3);
  latents ranked by probe attribution (mean latent difference x decoder . probe weight); the top n in
  (2, 5, 10, 20, 50, 100, 500) are zero-ablated: pooled residual - pooled latents[n] @ W_dec[n], which is SAEBench's
  decode(f_ablated) + error exactly (the decoder is linear) except that SAEBench also adds the ablated latents that an
  SAE puts on masked (all-zero) positions. S_SHIFT = (A_abl - A_base) / (A_oracle - A_base) in the direction SAEBench
  picks; TPP = mean over classes of (own-class accuracy drop - mean other-class drop).
- absorption (evals/absorption): "{word} has the first letter:" prompts with 10 in-context examples over the
  tokenizer's letter-only tokens (80/20 vocabulary split), residual at the word token; a 26-way logistic probe
  (Adam, pos-weighted BCE) is the ground truth; an L1 probe on latents ranks them, k-sparse probes (k <= 10, balanced
  logistic regression) find split latents (F1 jump >= 0.03); over the probe's true positives the absorption fraction
  is SAEBench's (cosine >= 0.1 absorbers, <= 3 of them, >= 40% of the probe projection). Mean over letters whose probe
  F1 > 0.6; SAEBench reports nothing when fewer than 20 letters qualify (`valid` says so). The absorption step reuses
  the test prompts' activations (SAEBench draws fresh in-context examples for it).
- autointerp needs an LLM judge (SAEBench asks gpt-4o-mini) and cannot run offline: `autointerp` returns None; a judge
  would plug in there, reading top-activating contexts from the same cached token batches.
Stochastic parts (negative sampling, probe minibatch order, probe initialisation) draw from torch's global RNG in
SAEBench's call order, seeded with --seed (42) at the start of each task, so the same seed gives the same numbers.
Tasks: offline (embedded stdlib data) or SAEBench's hub datasets, see saebench_data.py.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from formats import disk
from evals import saebench_data as sd

K_VALUES = (1, 2, 5, 10, 20, 50)
N_VALUES = (2, 5, 10, 20, 50, 100, 500)
LETTERS = sd.LETTERS


# ---------------------------------------------------------------------------------------------------------------------
# Probes (SAEBench's sparse_probing/probe_training.py, replayed with the same RNG calls)


class Probe(nn.Module):
    def __init__(self, dim: int, dtype=torch.float32):
        super().__init__()
        self.net = nn.Linear(dim, 1, bias=True, dtype=dtype)

    def forward(self, x):
        return self.net(x).squeeze(-1)


@torch.no_grad()
def accuracy(probe, x, y) -> float:
    return ((probe(x) > 0).long() == y).float().mean().item()


def train_probe(xtr, ytr, xte, yte, epochs, lr, batch, patience, l1=None):
    """SAEBench's train_probe_gpu: AdamW on BCE (+ L1 on the weight), keeping the probe of the best test accuracy."""
    probe = Probe(xtr.shape[1], xtr.dtype).to(xtr.device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    best, best_probe, bad = 0.0, None, 0
    for _ in range(epochs):
        order = torch.randperm(len(xtr))
        with torch.enable_grad():
            for i in range(0, len(xtr), batch):
                b = order[i:i + batch]
                loss = F.binary_cross_entropy_with_logits(probe(xtr[b]), ytr[b].to(xtr.dtype))
                if l1 is not None:
                    loss = loss + l1 * probe.net.weight.abs().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        acc = accuracy(probe, xte, yte)
        if acc > best:
            best, best_probe, bad = acc, copy.deepcopy(probe), 0
        else:
            bad += 1
        if bad >= patience:
            break
    return (best_probe or probe), best


def logreg(x, y, C: float = 1.0, balanced: bool = False, iters: int = 50):
    """sklearn LogisticRegression (L2, intercept unpenalised) at its optimum: Newton steps with backtracking, float64.
    Minimises sum_i s_i log(1 + exp(-t_i z_i)) + |w|^2 / (2C); s_i = n / (2 n_class) when balanced."""
    x, y = x.double(), y.double()
    n = len(y)
    s = torch.where(y > 0, n / (2 * y.sum()), n / (2 * (n - y.sum()))) if balanced else torch.ones(n, dtype=x.dtype)
    X = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    reg = torch.full((X.shape[1],), 1 / C, dtype=x.dtype)
    reg[-1] = 0
    t = torch.zeros(X.shape[1], dtype=x.dtype)

    def obj(t):
        z = X @ t
        return (s * (F.softplus(z) - y * z)).sum() + 0.5 * (reg * t * t).sum()
    f = obj(t)
    for _ in range(iters):
        p = torch.sigmoid(X @ t)
        g = X.T @ (s * (p - y)) + reg * t
        H = (X * (s * p * (1 - p))[:, None]).T @ X + torch.diag(reg) + 1e-9 * torch.eye(len(t), dtype=x.dtype)
        step, a = torch.linalg.solve(H, g), 1.0
        while a > 1e-10:
            f_new = obj(t - a * step)
            if f_new <= f - 1e-4 * a * (g @ step):
                break
            a /= 2
        t, f_prev, f = t - a * step, f, f_new
        if abs(f_prev - f) <= 1e-12 * max(1.0, abs(f)):
            break
    return t[:-1].float(), t[-1].float()


def probe_accuracies(train: dict, test: dict, k: int | None = None) -> dict[str, float]:
    """SAEBench's train_probe_on_activations: per class, top-k mean-difference latents + logistic regression (k given)
    or the full-width AdamW probe (k None)."""
    out = {}
    for cls in train:
        xtr, ytr = sd.probe_data(train, cls)
        xte, yte = sd.probe_data(test, cls)
        if k is None:
            out[cls] = train_probe(xtr, ytr, xte, yte, epochs=100, lr=1e-2, batch=250, patience=10)[1]
            continue
        diff = (xtr[ytr == 1].mean(0) - xtr[ytr == 0].mean(0)).abs()
        keep = torch.argsort(diff, descending=True)[:k].sort().values
        w, b = logreg(xtr[:, keep], ytr)
        out[cls] = (((xte[:, keep].double() @ w.double() + b) > 0).int() == yte).float().mean().item()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# SCR and TPP (SAEBench's scr_and_tpp/main.py on pooled features: columns [:d] residual, [d:] latents)


def node_effects(W_dec, probe, train: dict, cls: str, d: int, scr: bool):
    x, y = sd.probe_data(train, cls, scr)
    diff = x[y == 1, d:].mean(0) - x[y == 0, d:].mean(0)
    diff = diff if scr else diff.clamp(min=0)  # TPP: only latents more active on the class itself
    e = diff * (W_dec.float() @ probe.net.weight[0].float())
    return e.abs() if scr else e


def top_n(e, n):
    mask = torch.zeros_like(e, dtype=torch.bool)
    k = min(n, int((e != 0).sum()))
    if k:
        mask[e.topk(k).indices] = True
    return mask


def test_accuracies(probes, classes, acts, scr):
    """SAEBench's get_probe_test_accuracy (+ the SCR cross accuracies 'X probe on Y data')."""
    out = {c: accuracy(probes[c], *sd.probe_data(acts, c, scr)) for c in classes}
    if scr:
        for c in classes:
            x, y = sd.probe_data(acts, c, True)
            for o in (k for k in sd.SCR_KEYS if k != c):
                out[f"{o} probe on {c} data"] = accuracy(probes[o], x, y)
    return out


def scr_tpp_task(train: dict, test: dict, W_dec, d: int, scr: bool, ns=N_VALUES, probes=None):
    """One SAEBench run (a dataset for TPP, a column-1 pair for SCR): (scores, clean accuracies, ablated, probes)."""
    classes = list(sd.SCR_KEYS) if scr else list(train)
    res = {k: v[:, :d] for k, v in train.items()}, {k: v[:, :d] for k, v in test.items()}
    if probes is None:
        probes = {c: train_probe(*sd.probe_data(res[0], c, scr), *sd.probe_data(res[1], c, scr), epochs=20, lr=1e-3,
                                 batch=16, patience=20, l1=1e-3)[0] for c in classes}
    clean = test_accuracies(probes, classes, res[1], scr)
    effects = {c: node_effects(W_dec, probes[c], train, c, d, scr) for c in classes}
    ablated = {}
    for c in classes:
        ablated[c] = {}
        for n in ns:
            m = top_n(effects[c], n)
            acts = {k: v[:, :d] - v[:, d:][:, m] @ W_dec.float()[m] for k, v in test.items()}
            ablated[c][n] = test_accuracies(probes, classes, acts, scr)
    return (scr_scores(ablated, clean) if scr else tpp_scores(ablated, clean)), clean, ablated, probes


def scr_scores(ablated, clean) -> dict:
    """SAEBench's get_scr_plotting_dict: S_SHIFT per direction; the metric takes the direction whose biased probe is
    worse on that concept."""
    biased, out = "male_professor / female_nurse", {}
    d1, d2 = clean[f"{biased} probe on professor / nurse data"], clean[f"{biased} probe on male / female data"]
    for direction, (abl, data) in enumerate((("male / female", "professor / nurse"),
                                             ("professor / nurse", "male / female")), 1):
        for n, accs in ablated[abl].items():
            base, oracle = clean[f"{biased} probe on {data} data"], clean[data]
            score = 0 if oracle - base < 0.001 else (accs[f"{biased} probe on {data} data"] - base) / (oracle - base)
            out[f"scr_dir{direction}_threshold_{n}"] = score
            if (d1 < d2 and direction == 1) or (d1 > d2 and direction == 2):
                out[f"scr_metric_threshold_{n}"] = score
    return out


def tpp_scores(ablated, clean) -> dict:
    """SAEBench's create_tpp_plotting_dict (averaged over classes)."""
    per = {}
    for c in clean:
        for n, accs in ablated[c].items():
            intended = clean[c] - accs[c]
            others = [clean[o] - accs[o] for o in clean if o != c]
            per.setdefault(f"tpp_threshold_{n}_total_metric", []).append(intended - sum(others) / len(others))
            per.setdefault(f"tpp_threshold_{n}_intended_diff_only", []).append(intended)
            per.setdefault(f"tpp_threshold_{n}_unintended_diff_only", []).append(sum(others) / len(others))
    return {k: sum(v) / len(v) for k, v in per.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Absorption (SAEBench's absorption/: probing.py, k_sparse_probing.py, feature_absorption_calculator.py)


def train_multi_probe(x, y_onehot, epochs=50, lr=1e-2, end_lr=1e-5, weight_decay=1e-6, batch=4096, l1=None):
    """One-vs-rest logistic probes: Adam, BCE with pos_weight = negatives / positives, exponential lr decay to end_lr."""
    y = y_onehot.to(x.dtype)
    probe = nn.Linear(x.shape[1], y.shape[1]).to(x.device, x.dtype)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    pos_weight = (len(y) - y.sum(0)) / y.sum(0).clamp_min(1)
    with torch.enable_grad():
        for _ in range(epochs):
            for b in torch.randperm(len(x)).split(batch):
                loss = F.binary_cross_entropy_with_logits(probe(x[b]), y[b], pos_weight=pos_weight)
                if l1 is not None:
                    loss = loss + l1 * probe.weight.abs().sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    return probe.requires_grad_(False)


def f1(truth, pred) -> float:
    tp = (truth & pred).sum().item()
    return 2 * tp / max(truth.sum().item() + pred.sum().item(), 1)


def split_features(f1s: list[float], feats: list[list[int]], jump: float = 0.03) -> list[int]:
    """SAEBench's add_feature_splits_to_metrics_df: grow k while F1 rises by more than `jump`."""
    best, split = -100.0, []
    for score, fs in zip(f1s, feats):
        if score > best + jump:
            best, split = score, fs
        else:
            break
    return split


def absorption_fractions(x, latents, probe_dir, W_dec, main: list[int]):
    """Per row: (absorption fraction, full absorption) as FeatureAbsorptionCalculator.calculate_absorption."""
    u = probe_dir / probe_dir.norm()
    cos = F.cosine_similarity(u[None].to(W_dec), W_dec, dim=-1).float()
    proj, act = latents.float() * cos, x.float() @ u.float()
    main_t = torch.tensor(main, dtype=torch.long)
    main_proj = proj[:, main_t].sum(1)
    cand = proj.clone()
    cand[:, main_t] = 0
    cand = torch.where((cos >= 0.1) & (cand > 0), cand, torch.zeros_like(cand))
    absorb = cand.topk(min(3, cand.shape[1]), dim=1).values.sum(1)
    frac = torch.minimum(absorb, act - main_proj) / (torch.minimum(absorb, act - main_proj) + main_proj)
    frac = torch.where(main_proj <= 0, torch.ones_like(frac), frac.clamp(0, 1))
    frac = torch.where((main_proj >= act) | (absorb / act < 0.4), torch.zeros_like(frac), frac)
    top = proj.topk(1, dim=1).indices[:, 0]
    full = ((latents[:, main_t] < 1e-8).all(1) & (cos[top] >= 0.025) & (act >= 0) & (proj[torch.arange(len(top)), top] / act >= 0.4))
    return frac, full


def absorption(xtr, ytr, xte, yte, ftr, fte, W_dec, max_k=10, min_f1=0.6, min_letters=20) -> dict:
    """xtr / xte: residuals at the word token; ytr / yte: letter index; ftr / fte: their SAE latents."""
    probe = train_multi_probe(xtr, F.one_hot(ytr, 26), weight_decay=1e-4)
    l1 = train_multi_probe(ftr, F.one_hot(ytr, 26), l1=0.01)
    scores = probe(xte)
    per = {}
    for li in sorted(set(ytr.tolist())):
        truth = yte == li
        f1_probe = f1(truth, scores[:, li] > 0)
        f1s, feats = [], []
        for k in range(1, max_k + 1):
            ids = l1.weight[li].topk(k).indices
            w, b = logreg(ftr[:, ids], (ytr == li).int(), balanced=True, iters=100)
            f1s.append(f1(truth, (fte[:, ids].float() @ w + b) > 0))
            feats.append(ids.tolist())
        split = split_features(f1s, feats)
        tp = truth & (scores[:, li] > 0)
        frac, full = absorption_fractions(xte[tp], fte[tp], probe.weight[li], W_dec, split) if tp.any() else (
            torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        n_tp = max(int(tp.sum()), 1)
        per[LETTERS[li]] = {"f1_probe": f1_probe, "f1_sparse": f1s, "split_feats": split, "probe_tp": int(tp.sum()),
                            "mean_absorption_fraction": frac.sum().item() / n_tp, "full_absorption_rate":
                            full.sum().item() / n_tp}
    good = [v for v in per.values() if v["f1_probe"] > min_f1]
    def mean(f):
        return sum(f(v) for v in good) / len(good) if good else float("nan")
    return {"mean_absorption_fraction": mean(lambda v: v["mean_absorption_fraction"]),
            "mean_full_absorption": mean(lambda v: v["full_absorption_rate"]),
            "mean_num_split_features": mean(lambda v: len(v["split_feats"])),
            "letters_evaluated": len(good), "valid": len(good) >= min_letters, "per_letter": per}


# ---------------------------------------------------------------------------------------------------------------------
# Core metrics (the cached features the probes read are made in saebench_data.py)


# SAEBench's own names: its CE and KL count other positions than splice.py's ce_* and kl_* (see core)
CE_KEY = {"clean": "ce_loss_without_sae", "sae": "ce_loss_with_sae", "zero": "ce_loss_with_ablation"}
KL_KEY = {"sae": "kl_div_with_sae", "zero": "kl_div_with_ablation"}


@torch.no_grad()
def core(model, sae, layer, batches, specials, autocast_ctx, chunk=2048) -> dict:
    """SAEBench core metrics (run_evals) on token batches; specials: BOS / EOS / pad ids. CE at position t counts when
    token t is not special and t is not a window's last position, KL at every position whose token is not special
    (SAEBench's choice), under SAEBench's names."""
    sums = {k: [] for k in (*CE_KEY.values(), *KL_KEY.values(), "l0", "l1", "cossim")}  # on the device until the end
    ms, mad, mr = [], [], []
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    n_tok, err, sq, s1 = 0, 0.0, 0.0, torch.zeros(sae.d_in, dtype=torch.float64)
    for idx in batches:
        keep = ~torch.isin(idx, specials.to(idx.device))
        with autocast_ctx:
            x = model.blocks(model.embed(idx), 0, layer)
            xf = x[keep].float()
            f = sd.latents(sae, xf)
            xh = sae.decode(f).float()
            recon = x.clone()
            recon[keep] = xh.to(x.dtype)
            h = {s: model.blocks(v, layer + 1) for s, v in (("clean", x), ("sae", recon), ("zero", torch.zeros_like(x)))}
        T, ids, kp = idx.shape[1], idx.reshape(-1), keep.reshape(-1)
        flat = {k: v.reshape(-1, v.shape[-1]) for k, v in h.items()}
        for c in range(0, len(ids), chunk):
            rows = torch.arange(c, min(c + chunk, len(ids)), device=idx.device)
            nxt = ids[(rows + 1).clamp(max=len(ids) - 1)]
            ce_rows = kp[rows] & (rows % T < T - 1)  # SAEBench: CE at t kept when token t is not special
            with autocast_ctx:
                lp = {k: F.log_softmax(model.head(v[c:c + chunk]).float(), -1) for k, v in flat.items()}
            for k in ("clean", "sae", "zero"):
                sums[CE_KEY[k]].append(-lp[k].gather(1, nxt[:, None])[:, 0][ce_rows])
                if k != "clean":
                    sums[KL_KEY[k]].append((lp["clean"].exp() * (lp["clean"] - lp[k])).sum(-1)[kp[rows]])
        ss = (xf - xh).pow(2).sum(-1).double()
        sums["l0"].append((f != 0).sum(-1).float())
        sums["l1"].append(f.sum(-1))
        sums["cossim"].append(F.cosine_similarity(xf, xh, dim=-1, eps=0))
        ms.append(xf.pow(2).sum(-1).mean().item())
        mad.append(xf.pow(2).mean(0).cpu())
        mr.append(ss.mean().item())
        fired += (f > 0).sum(0).double().cpu()
        n_tok += len(xf)
        err, sq, s1 = err + ss.sum().item(), sq + xf.double().pow(2).sum().item(), s1 + xf.double().sum(0).cpu()
    m = {k: torch.cat(v).mean().item() for k, v in sums.items()}
    density = fired / max(n_tok, 1)
    ce, kl = {k: m[v] for k, v in CE_KEY.items()}, {k: m[v] for k, v in KL_KEY.items()}
    m.update(ce_loss_score=(ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
             kl_div_score=(kl["zero"] - kl["sae"]) / kl["zero"],
             explained_variance=1 - float(np.mean(mr)) / (float(np.mean(ms)) - torch.cat(mad).mean().item() ** 2),
             fvu=err / (sq - (s1.pow(2).sum().item() / max(n_tok, 1))), dead=int((density == 0).sum()),
             dense=int((density > 0.1).sum()), replaced=n_tok)
    return m


# ---------------------------------------------------------------------------------------------------------------------
# The run: eval.py --saebench


def _mean(dicts: list[dict]) -> dict:
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


def autointerp(*_):
    """SAEBench's autointerp scores latent explanations with an LLM judge: not available offline."""
    return None


def evaluate(model, saes, cfg, device, autocast_ctx, seed: int = 42) -> dict:
    """Table 6 for the first SAE of `saes` [(layer, SAE)]: base model (adapters off) vs adapted (adapters on),
    written to cfg.out/saebench.{json,md,png}. Returns the results with the table under 'markdown'."""
    import os
    import time
    from data import load_meta
    from formats.tokenizer import load_tokenizer
    from lora import adapters_disabled, adapters_enabled, lora_modules
    layer, sae = saes[0]
    t0 = time.time()
    meta = load_meta(cfg.data) if cfg.data else {}
    offline = meta.get("source") == "stdlib"
    tok = load_tokenizer(cfg.tokenizer or (meta["tokenizer"] if offline else cfg.model))
    specials = torch.tensor(sorted({i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None}))
    probing, tpp, scr = sd.tasks(offline, seed)
    groups = sd.token_sets(tok, {"probing": probing, "scr": scr})
    fl_train, fl_test, pos = sd.first_letter_prompts(tok, seed, max_words=cfg.saebench_words)
    batches = sd.core_batches(cfg.data, device)
    print(f"saebench: {len(groups)} text sets ({sum(map(len, groups.values()))} texts), {len(fl_train)} + "
          f"{len(fl_test)} first-letter prompts, {len(batches)} core batches ({time.time() - t0:.0f}s)", flush=True)
    settings = {"base": lambda: adapters_disabled(model)}
    if lora_modules(model):
        settings["adapted"] = lambda: adapters_enabled(model)
    W_dec, d = sae.W_dec.detach().float().cpu(), model.cfg.d_model
    res = {"layer": layer, "tasks": "offline (stdlib)" if offline else "hub", "settings": {}}
    for s, ctx in settings.items():
        with ctx():
            feats = {k: sd.pooled(model, sae, layer, v, specials, autocast_ctx) for k, v in groups.items()}
            print(f"saebench [{s}]: pooled features cached ({time.time() - t0:.0f}s)", flush=True)
            m = {"core": core(model, sae, layer, batches, specials, autocast_ctx)} if batches else {}
            fl = [sd.word_acts(model, sae, layer, [ids for ids, _ in rows], pos, autocast_ctx)
                  for rows in (fl_train, fl_test)]
        print(f"saebench [{s}]: core done ({time.time() - t0:.0f}s)", flush=True)
        sp = []
        for name, task in probing.items():  # columns [:d] residual (the LLM probe), [d:] latents
            torch.manual_seed(seed)
            resid, lat = (sd.task_features(feats, "probing", name, task, c) for c in (slice(None, d), slice(d, None)))
            r = {"llm_test_accuracy": probe_accuracies(*resid), "sae_test_accuracy": probe_accuracies(*lat)}
            r.update({f"sae_top_{k}_test_accuracy": probe_accuracies(*lat, k) for k in K_VALUES})
            sp.append({k: sum(v.values()) / len(v) for k, v in r.items()})
        m["sparse_probing"] = _mean(sp)
        for key, tasks, group in (("tpp", tpp, "probing"), ("scr", scr, "scr")):
            runs = []
            for name, task in tasks.items():
                torch.manual_seed(seed)
                runs.append(scr_tpp_task(*sd.task_features(feats, group, name, task), W_dec, d, key == "scr")[0])
            m[key] = _mean(runs)
        print(f"saebench [{s}]: sparse probing, TPP, SCR done ({time.time() - t0:.0f}s)", flush=True)
        torch.manual_seed(seed)
        m["absorption"] = absorption(fl[0][0], torch.tensor([y for _, y in fl_train]), fl[1][0],
                                     torch.tensor([y for _, y in fl_test]), fl[0][1], fl[1][1], W_dec)
        m["autointerp"] = autointerp(model, sae)
        print(f"saebench [{s}]: absorption done ({time.time() - t0:.0f}s)", flush=True)
        res["settings"][s] = m
    res["seconds"] = time.time() - t0
    res["markdown"] = table(res)
    os.makedirs(cfg.out, exist_ok=True)
    disk.write_json(os.path.join(cfg.out, "saebench.json"), disk.jsonable(res), indent=1)
    disk.write_text(os.path.join(cfg.out, "saebench.md"), res["markdown"])
    if cfg.plots:
        plot(res, os.path.join(cfg.out, "saebench.png"))
    return res


def rows(m: dict) -> list[tuple[str, float | None]]:
    out = [(f"SCR METRIC @{n}", m["scr"].get(f"scr_metric_threshold_{n}")) for n in N_VALUES]
    out += [(f"TPP METRIC @{n}", m["tpp"][f"tpp_threshold_{n}_total_metric"]) for n in N_VALUES]
    out += [(f"SPARSE PROBING (TOP {k})", m["sparse_probing"][f"sae_top_{k}_test_accuracy"]) for k in K_VALUES]
    out += [("SPARSE PROBING (TEST)", m["sparse_probing"]["sae_test_accuracy"]),
            ("(LLM probe accuracy)", m["sparse_probing"]["llm_test_accuracy"]),
            ("AUTOINTERP", m["autointerp"]), ("ABSORPTION", m["absorption"]["mean_absorption_fraction"])]
    c = m.get("core", {})
    out += [(name, c.get(key)) for name, key in (("L0", "l0"), ("FVU", "fvu"), ("EXPLAINED VARIANCE (SAEBench)",
            "explained_variance"), ("COSINE SIMILARITY", "cossim"), ("CE LOSS SCORE", "ce_loss_score"),
            ("KL SCORE", "kl_div_score"), ("DEAD LATENTS", "dead"), ("DENSE LATENTS (>10%)", "dense"))]
    return out


def table(res: dict) -> str:
    cols = [s for s in ("adapted", "base") if s in res["settings"]]
    vals = {s: dict(rows(res["settings"][s])) for s in cols}
    names = {"adapted": "LORA MODEL", "base": "BASE MODEL"}
    lines = [f"## SAEBench (layer {res['layer']} SAE, {res['tasks']} tasks; Table 6)", "",
             "| metric | " + " | ".join(names[s] for s in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, _ in rows(res["settings"]["base"]):
        cell = [("n/a (needs an LLM judge)" if name == "AUTOINTERP" else "-") if vals[s][name] is None else
                f"{vals[s][name]:.3f}" if isinstance(vals[s][name], float) else str(vals[s][name]) for s in cols]
        lines.append(f"| {name} | " + " | ".join(cell) + " |")
    ab = res["settings"]["base"]["absorption"]
    lines += ["", f"absorption over {ab['letters_evaluated']} letters with probe F1 > 0.6"
              + ("" if ab["valid"] else " (SAEBench needs 20 and would report none)")]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("saebench plot skipped: matplotlib is not installed; every number is in saebench.json")
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for s, m in res["settings"].items():
        r = dict(rows(m))
        for ax, xs, key in ((axes[0], N_VALUES, "SCR METRIC @{}"), (axes[1], N_VALUES, "TPP METRIC @{}"),
                            (axes[2], K_VALUES, "SPARSE PROBING (TOP {})")):
            ax.plot(xs, [r[key.format(x)] for x in xs], marker="o", label=s)
            ax.set_xscale("log"), ax.set_title(key.split(" @")[0].split(" (")[0]), ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
